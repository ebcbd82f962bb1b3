//! The report's bar chart: delivered Mpps per forwarding configuration,
//! as plain SVG.

use std::fmt::Write as _;

use super::measure::{FwdRow, Hop};
use crate::config::Forwarding;

/// A horizontal bar chart of delivered Mpps per forwarding configuration,
/// min–max as a whisker, the ceiling as a dashed line: plain SVG, no
/// plotting dependency.
pub(super) fn plot_svg(fwd: &[FwdRow]) -> String {
    const ROW: f64 = 16.0;
    const LABEL: f64 = 230.0;
    const WIDTH: f64 = 520.0;
    const TOP: f64 = 30.0;
    let max = fwd
        .iter()
        .map(|r| r.delivered.max)
        .filter(|m| m.is_finite())
        .fold(1.0f64, f64::max)
        .ceil();
    let x = |mpps: f64| LABEL + WIDTH * (mpps / max).clamp(0.0, 1.0);
    let height = TOP + ROW * fwd.len() as f64 + 30.0;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"11\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{LABEL}\" y=\"16\" font-size=\"13\">Delivered Mpps at the sink (median, min–max)</text>\n",
        w = LABEL + WIDTH + 60.0
    );
    for (i, r) in fwd.iter().enumerate() {
        let y = TOP + ROW * i as f64;
        let label = match r.hop {
            Hop::Ceiling | Hop::HashFwd | Hop::Ceiling6 => r.hop.to_string(),
            Hop::Lb(_) | Hop::Lb6(_) => format!(
                "{}, {} backends, {} flows",
                r.hop,
                r.backends,
                super::report::flows_cell(r)
            ),
        };
        let color = match r.hop {
            Hop::Ceiling | Hop::Ceiling6 => "#777",
            Hop::HashFwd => "#aaa",
            Hop::Lb(Forwarding::Nat) | Hop::Lb6(Forwarding::Nat) => "#3b7dd8",
            Hop::Lb(Forwarding::FullNat) | Hop::Lb6(Forwarding::FullNat) => "#8e44ad",
            Hop::Lb(Forwarding::Dsr) | Hop::Lb6(Forwarding::Dsr) => "#e08a1e",
            Hop::Lb(Forwarding::Ipip | Forwarding::Gue)
            | Hop::Lb6(Forwarding::Ipip | Forwarding::Gue) => "#5aa469",
        };
        let d = &r.delivered;
        let _ = write!(
            svg,
            "<text x=\"{lx}\" y=\"{ty}\" text-anchor=\"end\">{label}</text>\n\
             <rect x=\"{LABEL}\" y=\"{y}\" width=\"{bw:.1}\" height=\"{bh}\" fill=\"{color}\"/>\n\
             <line x1=\"{x0:.1}\" x2=\"{x1:.1}\" y1=\"{wy}\" y2=\"{wy}\" stroke=\"black\"/>\n\
             <text x=\"{vx:.1}\" y=\"{ty}\">{m:.2}</text>\n",
            lx = LABEL - 6.0,
            ty = y + ROW - 5.0,
            bw = x(d.median) - LABEL,
            bh = ROW - 3.0,
            x0 = x(d.min),
            x1 = x(d.max),
            wy = y + (ROW - 3.0) / 2.0,
            vx = x(d.max) + 4.0,
            m = d.median,
        );
    }
    if let Some(c) = fwd.iter().find(|r| r.hop == Hop::Ceiling) {
        let cx = x(c.delivered.median);
        let _ = write!(
            svg,
            "<line x1=\"{cx:.1}\" x2=\"{cx:.1}\" y1=\"{TOP}\" y2=\"{y2}\" stroke=\"#777\" stroke-dasharray=\"4 3\"/>\n\
             <text x=\"{cx:.1}\" y=\"{ly}\" text-anchor=\"middle\">ceiling {m:.2} Mpps</text>\n",
            y2 = height - 25.0,
            ly = height - 10.0,
            m = c.delivered.median
        );
    }
    svg.push_str("</svg>\n");
    svg
}
