//! The firewall stage of the packet path (step 4, new flows to a VIP
//! only): deny and allow lists of source prefixes in LPM tries, per scope
//! (global or one service), and the per-source new-flow token buckets.
//! Established flows never reach it. Each family has its tries and
//! buckets; scopes, flags, rule ids and counters are shared.

use aya_ebpf::{
    helpers::bpf_ktime_get_ns,
    macros::map,
    maps::{Array, LpmTrie, LruHashMap, PerCpuArray, lpm_trie::Key},
};
use lb_common::{
    Bucket, BucketKey, FW_BUCKETS_SIZE, FW_F_ALLOW, FW_F_DENY, FW_F_DENY6, FW_F_RATE, FW_NS,
    FW_REFILL_CAP_NS, FW_SCOPE_COUNT, FwKey, FwScope, MAX_FW_RULES, Verdict,
    ipv6::Addr6,
    maps6::{BucketKey6, FwKey6, FwScratch6},
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
/// (scope, IPv6 source prefix) → rule id: IPv6 deny rules. Written by the
/// agent (rule ids shared with IPv4's, one counter array).
#[map]
static FW_DENY6: LpmTrie<FwKey6, u32> = LpmTrie::with_max_entries(MAX_FW_RULES, 0);
/// (scope, IPv6 source prefix) → rule id: IPv6 entries of allow lists.
#[map]
static FW_ALLOW6: LpmTrie<FwKey6, u32> = LpmTrie::with_max_entries(MAX_FW_RULES, 0);
/// Scope → the mask an IPv6 source's bucket key takes (network-order
/// words: all ones per address, a /64's per /64). Written by the agent.
#[map]
static FW_MASKS6: Array<Addr6> = Array::with_max_entries(FW_SCOPE_COUNT, 0);
/// (scope, masked IPv6 source) → token bucket. This program (an LRU).
#[map]
static FW_BUCKETS6: LruHashMap<BucketKey6, Bucket> =
    LruHashMap::with_max_entries(FW_BUCKETS_SIZE, 0);
/// The IPv6 firewall's keys, per CPU (`check6`).
#[map]
static FW_SCRATCH6: PerCpuArray<FwScratch6> = PerCpuArray::with_max_entries(1, 0);

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
    take_token_in(&FW_BUCKETS, &key, conf)
}

/// [`take_token`]'s bucket rules over either family's bucket map.
#[inline(always)]
fn take_token_in<K>(buckets: &LruHashMap<K, Bucket>, key: &K, conf: &FwScope) -> bool {
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    let cap = u64::from(conf.burst) * FW_NS;
    let Some(bucket) = buckets.get_ptr_mut(key) else {
        // First new flow from this source (or its bucket was evicted): a
        // full bucket (burst >= 1), less this flow's token. A failed
        // insert lets the flow through: the limit fails open, not closed.
        let fresh = Bucket {
            tokens: cap.saturating_sub(FW_NS),
            last_ns: now,
        };
        let _ = buckets.insert(key, &fresh, 0);
        return true;
    };
    // SAFETY: a bucket map's value; racing CPUs at worst lose a refill.
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

/// An IPv6 source's firewall in one scope, IPv4's rules over IPv6's
/// tries: a deny rule (`FW_DENY6`) drops the new flow, an allow list (one
/// list over both families) drops any source its `FW_ALLOW6` entries do
/// not match, then the source's bucket (`FW_BUCKETS6`, the source masked by
/// `FW_MASKS6[scope]`: per address, or per /64 with `per = "/64"`) must
/// hold a token. Same verdicts and rule counters as IPv4's. A scope
/// without rules costs one array lookup, as IPv4's.
#[inline(always)]
pub(crate) fn firewall6(scope: u32, saddr: &Addr6) -> Result<(), Outcome> {
    let Some(conf) = FW_SCOPES.get(scope) else {
        return Ok(());
    };
    if conf.flags == 0 {
        return Ok(());
    }
    match check6(scope, saddr) {
        FW6_PASS => Ok(()),
        FW6_DENIED => Err(drop(Verdict::DropFirewallDeny)),
        FW6_NOT_ALLOWED => Err(drop(Verdict::DropFirewallNotAllowed)),
        _ => Err(drop(Verdict::DropRateLimited)),
    }
}

const FW6_PASS: u32 = 0;
const FW6_DENIED: u32 = 1;
const FW6_NOT_ALLOWED: u32 = 2;
const FW6_RATE_LIMITED: u32 = 3;

/// [`firewall6`]'s checks, out of line with their keys in per-CPU scratch
/// (IPv6's second stage has no stack left for a 24-byte trie key and a
/// 20-byte bucket key): which of the `FW6_*` outcomes.
#[inline(never)]
fn check6(scope: u32, saddr: &Addr6) -> u32 {
    let (Some(conf), Some(scratch)) = (FW_SCOPES.get(scope), FW_SCRATCH6.get_ptr_mut(0)) else {
        return FW6_PASS;
    };
    let flags = conf.flags;
    // SAFETY: this CPU's scratch value, used by this packet only.
    let scratch = unsafe { &mut *scratch };
    scratch.prefix_len = 160;
    scratch.rule = FwKey6 {
        scope,
        addr: *saddr,
    };
    // SAFETY: `FwScratch6` starts with an LPM key's layout (a u32 prefix
    // length, then `FwKey6`, packed: no padding in either).
    let key = unsafe { &*(scratch as *const FwScratch6 as *const Key<FwKey6>) };
    if flags & FW_F_DENY6 != 0
        && let Some(&rule) = FW_DENY6.get(key)
    {
        count(&FW_RULE_STATS, rule, 1, 0);
        return FW6_DENIED;
    }
    if flags & FW_F_ALLOW != 0 {
        match FW_ALLOW6.get(key) {
            Some(&rule) => count(&FW_RULE_STATS, rule, 1, 0),
            None => return FW6_NOT_ALLOWED,
        }
    }
    if flags & FW_F_RATE != 0 {
        let Some(mask) = FW_MASKS6.get(scope) else {
            return FW6_PASS;
        };
        scratch.bucket = BucketKey6 {
            scope,
            addr: [
                saddr[0] & mask[0],
                saddr[1] & mask[1],
                saddr[2] & mask[2],
                saddr[3] & mask[3],
            ],
        };
        if !take_token_in(&FW_BUCKETS6, &scratch.bucket, conf) {
            return FW6_RATE_LIMITED;
        }
    }
    FW6_PASS
}
