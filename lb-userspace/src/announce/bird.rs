//! A client of BIRD 2's control socket (the protocol `birdc` speaks):
//! `configure`, and what BIRD reports of its BGP sessions and the routes
//! each exports ([`BirdView`]).

use std::{
    collections::BTreeMap,
    io::{BufReader, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use super::AnnounceError;
pub use crate::wire::{BirdProtocol, BirdView};

/// How long one exchange with BIRD may take: it answers a local socket in
/// well under a millisecond, and the agent's loop waits for it.
const BIRD_TIMEOUT: Duration = Duration::from_millis(500);

/// A client of BIRD's control socket (the protocol `birdc` speaks: one
/// command line; reply lines `NNNN-text` continued, `NNNN text` last, or
/// ` text` continuing the previous code; codes 8xxx and 9xxx are errors).
pub struct Bird {
    socket: PathBuf,
}

/// One reply line: its code (the previous line's for ` text` lines) and text.
type ReplyLine = (u16, String);

impl Bird {
    pub fn new(socket: &Path) -> Bird {
        Bird {
            socket: socket.to_path_buf(),
        }
    }

    /// `configure`: BIRD re-reads its config (and so the include file); a
    /// static protocol whose routes changed updates them without touching
    /// the BGP sessions.
    pub fn configure(&self) -> Result<(), AnnounceError> {
        self.command("configure").map(drop)
    }

    /// `show protocols` and, for each BGP protocol, `show route export`.
    pub fn view(&self) -> Result<BirdView, AnnounceError> {
        let protocols = parse_protocols(&self.command("show protocols")?);
        let mut exported = BTreeMap::new();
        // A session that is not up has no table to show ("No valid
        // tables"): it exports nothing.
        for p in protocols
            .iter()
            .filter(|p| p.proto == "BGP" && p.state == "up")
        {
            let prefixes = match self.command(&format!("show route export {}", p.name)) {
                Ok(lines) => parse_route_prefixes(&lines),
                Err(AnnounceError::Refused { .. }) => Vec::new(),
                Err(e) => return Err(e),
            };
            exported.insert(p.name.clone(), prefixes);
        }
        Ok(BirdView {
            protocols,
            exported,
        })
    }

    fn command(&self, command: &str) -> Result<Vec<ReplyLine>, AnnounceError> {
        let io = |source| AnnounceError::Socket {
            socket: self.socket.clone(),
            source,
        };
        let stream = UnixStream::connect(&self.socket).map_err(io)?;
        stream.set_read_timeout(Some(BIRD_TIMEOUT)).map_err(io)?;
        stream.set_write_timeout(Some(BIRD_TIMEOUT)).map_err(io)?;
        let mut reader = BufReader::new(stream.try_clone().map_err(io)?);
        // The greeting: "0001 BIRD 2.0.12 ready."
        read_reply(&mut reader).map_err(io)?;
        (&stream)
            .write_all(format!("{command}\n").as_bytes())
            .map_err(io)?;
        let lines = read_reply(&mut reader).map_err(io)?;
        if let Some((_, text)) = lines.iter().find(|(code, _)| *code >= 8000) {
            return Err(AnnounceError::Refused {
                socket: self.socket.clone(),
                command: command.to_owned(),
                reply: text.clone(),
            });
        }
        Ok(lines)
    }
}

/// Reads reply lines up to the last one (`NNNN text`).
fn read_reply(reader: &mut impl std::io::BufRead) -> std::io::Result<Vec<ReplyLine>> {
    let mut lines = Vec::new();
    let mut code = 0;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "BIRD closed the connection mid-reply",
            ));
        }
        let line = line.trim_end_matches('\n');
        match parse_reply_line(line) {
            ReplyPart::Continued(c, text) => {
                code = c;
                lines.push((c, text.to_owned()));
            }
            ReplyPart::Last(c, text) => {
                lines.push((c, text.to_owned()));
                return Ok(lines);
            }
            ReplyPart::More(text) => lines.push((code, text.to_owned())),
        }
    }
}

enum ReplyPart<'a> {
    Continued(u16, &'a str),
    Last(u16, &'a str),
    More(&'a str),
}

fn parse_reply_line(line: &str) -> ReplyPart<'_> {
    let code = line.get(..4).and_then(|c| c.parse::<u16>().ok());
    match (code, line.as_bytes().get(4)) {
        (Some(c), Some(b'-')) => ReplyPart::Continued(c, &line[5..]),
        (Some(c), Some(b' ')) => ReplyPart::Last(c, &line[5..]),
        (Some(c), None) => ReplyPart::Last(c, ""),
        _ => ReplyPart::More(line.strip_prefix(' ').unwrap_or(line)),
    }
}

/// `show protocols` rows (code 1002): name, protocol, table, state, since
/// (one or two words), info.
fn parse_protocols(lines: &[ReplyLine]) -> Vec<BirdProtocol> {
    lines
        .iter()
        .filter(|(code, _)| *code == 1002)
        .filter_map(|(_, text)| {
            let mut words = text.split_whitespace();
            let name = words.next()?.to_owned();
            let proto = words.next()?.to_owned();
            let _table = words.next()?;
            let state = words.next()?.to_owned();
            let rest: Vec<&str> = words.collect();
            // "Since" is a time (hh:mm:ss[.fff]) or a date and a time; the
            // info is what follows.
            let skip = rest
                .iter()
                .take_while(|w| w.chars().all(|c| c.is_ascii_digit() || ".:-".contains(c)))
                .count();
            Some(BirdProtocol {
                name,
                proto,
                state,
                info: rest[skip..].join(" "),
            })
        })
        .collect()
}

/// The prefixes of `show route` rows (code 1007; a row starting with a
/// space is another path of the same prefix).
fn parse_route_prefixes(lines: &[ReplyLine]) -> Vec<String> {
    lines
        .iter()
        .filter(|(code, text)| *code == 1007 && !text.starts_with(' '))
        .filter_map(|(_, text)| text.split_whitespace().next())
        .filter(|w| w.contains('/'))
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_lines_of_birds_socket_protocol() {
        let text = "0001 BIRD 2.0.12 ready.\n";
        let mut r = std::io::Cursor::new(text);
        assert_eq!(
            read_reply(&mut r).unwrap(),
            [(1, "BIRD 2.0.12 ready.".to_owned())]
        );
        let text = "2002-Name       Proto      Table      State  Since         Info\n\
                    1002-device1    Device     ---        up     21:20:10.123  \n \
                    lb1        BGP        ---        up     21:20:12.456  Established   \n \
                    bfd1       BFD        ---        up     2026-11-23 21:20:10  \n\
                    0000 \n";
        let lines = read_reply(&mut std::io::Cursor::new(text)).unwrap();
        let p = parse_protocols(&lines);
        assert_eq!(p.len(), 3);
        assert_eq!(
            p[1],
            BirdProtocol {
                name: "lb1".into(),
                proto: "BGP".into(),
                state: "up".into(),
                info: "Established".into()
            }
        );
        assert_eq!(p[2].info, "");
        // As BIRD 2.0.12 sends it: the route continues code 1007 with a
        // space; a second path of the same prefix is indented further.
        let routes = "1007-Table master4:\n 198.18.0.10/32       blackhole [lb_vips 21:20:10.123] * (200)\n \
                      \x20                    blackhole [other 21:20:11] (100)\n0000 \n";
        let lines = read_reply(&mut std::io::Cursor::new(routes)).unwrap();
        assert_eq!(parse_route_prefixes(&lines), ["198.18.0.10/32"]);
    }

    #[test]
    fn an_error_code_ends_the_reply() {
        let text = "8002 /etc/bird/bird.conf:3:1 syntax error\n";
        let lines = read_reply(&mut std::io::Cursor::new(text)).unwrap();
        assert_eq!(lines[0].0, 8002);
    }
}
