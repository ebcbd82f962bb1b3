//! The firewall stage of the packet path (step 4, new flows to a VIP
//! only): deny and allow lists of source prefixes in LPM tries, per scope
//! (global or one service), and the per-source new-flow token buckets.
//! Established flows never reach it.

use aya_ebpf::{
    helpers::bpf_ktime_get_ns,
    macros::map,
    maps::{Array, LpmTrie, LruHashMap, PerCpuArray, lpm_trie::Key},
};
use lb_common::{
    Bucket, BucketKey, FW_BUCKETS_SIZE, FW_F_ALLOW, FW_F_DENY, FW_F_RATE, FW_NS, FW_REFILL_CAP_NS,
    FW_SCOPE_COUNT, FwKey, FwScope, MAX_FW_RULES, Verdict,
};

use crate::verdict::{Outcome, count, drop};

/// Firewall scope (service id, or `FW_GLOBAL`) → which checks it needs and
/// its rate limit. Written by the agent.
#[map]
static FW_SCOPES: Array<FwScope> = Array::with_max_entries(FW_SCOPE_COUNT, 0);
/// (scope, source prefix) → rule id: deny rules. Written by the agent.
#[map]
static FW_DENY: LpmTrie<FwKey, u32> = LpmTrie::with_max_entries(MAX_FW_RULES, 0);
/// (scope, source prefix) → rule id: allow lists. Written by the agent.
#[map]
static FW_ALLOW: LpmTrie<FwKey, u32> = LpmTrie::with_max_entries(MAX_FW_RULES, 0);
/// Rule id → new flows the rule decided, per CPU. This program.
#[map]
static FW_RULE_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(MAX_FW_RULES, 0);
/// (scope, masked source) → token bucket of the new-flow rate limit. This
/// program (the LRU forgets sources not seen for a while).
#[map]
static FW_BUCKETS: LruHashMap<BucketKey, Bucket> = LruHashMap::with_max_entries(FW_BUCKETS_SIZE, 0);

/// The firewall, one scope (`FW_GLOBAL` or a service id), for a new flow
/// to a VIP: a deny rule drops it; an allow list drops any source it does
/// not match; then the source's token bucket must hold a token. Deny wins
/// over allow. A matching rule counts in `FW_RULE_STATS[rule id]`. A scope
/// without rules costs one array lookup.
#[inline(always)]
pub(crate) fn firewall(scope: u32, saddr: u32) -> Result<(), Outcome> {
    let Some(conf) = FW_SCOPES.get(scope) else {
        return Ok(());
    };
    let flags = conf.flags;
    if flags == 0 {
        return Ok(());
    }
    let key = Key::new(64, FwKey { scope, addr: saddr });
    if flags & FW_F_DENY != 0
        && let Some(&rule) = FW_DENY.get(&key)
    {
        count(&FW_RULE_STATS, rule, 1, 0);
        return Err(drop(Verdict::DropFirewallDeny));
    }
    if flags & FW_F_ALLOW != 0 {
        match FW_ALLOW.get(&key) {
            Some(&rule) => count(&FW_RULE_STATS, rule, 1, 0),
            None => return Err(drop(Verdict::DropFirewallNotAllowed)),
        }
    }
    if flags & FW_F_RATE != 0 && !take_token(scope, conf, saddr) {
        return Err(drop(Verdict::DropRateLimited));
    }
    Ok(())
}

/// The new-flow token bucket of `saddr` (masked to its address or prefix)
/// in `scope`: refilled at `rate` per second up to `burst`, one token per
/// new flow. CPUs update a bucket without a lock: two CPUs racing on one
/// source may both take the last token (the limit is approximate by the
/// number of CPUs, never by more).
#[inline(always)]
fn take_token(scope: u32, conf: &FwScope, saddr: u32) -> bool {
    let key = BucketKey {
        scope,
        addr: saddr & conf.mask,
    };
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    let cap = u64::from(conf.burst) * FW_NS;
    let Some(bucket) = FW_BUCKETS.get_ptr_mut(&key) else {
        // First new flow from this source (or its bucket was evicted): a
        // full bucket (burst >= 1), less this flow's token. A failed
        // insert lets the flow through: the limit fails open, not closed.
        let fresh = Bucket {
            tokens: cap.saturating_sub(FW_NS),
            last_ns: now,
        };
        let _ = FW_BUCKETS.insert(&key, &fresh, 0);
        return true;
    };
    // SAFETY: an FW_BUCKETS value; racing CPUs at worst lose a refill.
    let bucket = unsafe { &mut *bucket };
    let elapsed = now.saturating_sub(bucket.last_ns);
    let tokens = if elapsed >= FW_REFILL_CAP_NS {
        cap
    } else {
        (bucket.tokens + elapsed * u64::from(conf.rate)).min(cap)
    };
    bucket.last_ns = now;
    if tokens < FW_NS {
        bucket.tokens = tokens;
        return false;
    }
    bucket.tokens = tokens - FW_NS;
    true
}

/// An IPv6 source's firewall in one scope. The kernel holds IPv4 rules
/// only so far (config refuses IPv6 prefixes and rate limits beside IPv6
/// services): an IPv6 source matches no deny rule, and a scope with an
/// allow list (one list over both families) does not allow it.
#[inline(always)]
pub(crate) fn firewall6(scope: u32) -> Result<(), Outcome> {
    match FW_SCOPES.get(scope) {
        Some(conf) if conf.flags & FW_F_ALLOW != 0 => Err(drop(Verdict::DropFirewallNotAllowed)),
        _ => Ok(()),
    }
}
