//! A reload's new pool login, tried on the members before it applies
//! ([`vet_new_logins`]): a typo must not take the write VIP to nobody.

use std::{path::Path, time::Duration};

use tracing::info;

use crate::{
    config::{ConfigError, Pool},
    health::mysql::{self, LoginFailure},
};

/// The longest a reload waits for a member to try a new login.
const LOGIN_TRY_MAX: Duration = Duration::from_secs(3);

/// What trying a pool's new login on its members found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoginVerdict {
    /// At least one member accepted it (named).
    Accepted(String),
    /// No member could be reached: the login cannot be tried (and the
    /// running one works nowhere either); the reasons.
    Untried(Vec<String>),
    /// Members answered and every one refused it; the reasons.
    Refused(Vec<String>),
}

/// The verdict on one pool's login from each member's attempt.
pub fn login_verdict(attempts: &[(String, Result<(), LoginFailure>)]) -> LoginVerdict {
    if let Some((name, _)) = attempts.iter().find(|(_, r)| r.is_ok()) {
        return LoginVerdict::Accepted(name.clone());
    }
    let reasons = |refused: bool| -> Vec<String> {
        attempts
            .iter()
            .filter_map(|(_, r)| r.as_ref().err())
            .filter(|e| matches!(e, LoginFailure::Refused(_)) == refused)
            .map(|e| e.reason().to_owned())
            .collect()
    };
    let refused = reasons(true);
    if refused.is_empty() {
        LoginVerdict::Untried(reasons(false))
    } else {
        LoginVerdict::Refused(refused)
    }
}

/// Tries `pool`'s login on every member at once; one result per member.
async fn try_login(pool: &Pool) -> Vec<(String, Result<(), LoginFailure>)> {
    let timeout = pool.health.timeout.min(LOGIN_TRY_MAX);
    let mut tries = tokio::task::JoinSet::new();
    for (i, m) in pool.members.iter().enumerate() {
        let (target, login) = (pool.health.target(m.address), pool.login.clone());
        tries.spawn(async move {
            let result = match mysql::log_in(target, &login, timeout).await {
                Ok(conn) => {
                    // A failed goodbye changes nothing about the login.
                    let _ = conn.disconnect().await;
                    Ok(())
                }
                Err(e) => Err(e),
            };
            (i, result)
        });
    }
    let mut results: Vec<(usize, Result<(), LoginFailure>)> = Vec::new();
    while let Some(done) = tries.join_next().await {
        if let Ok(r) = done {
            results.push(r);
        }
    }
    results.sort_by_key(|(i, _)| *i);
    results
        .into_iter()
        .filter_map(|(i, r)| Some((pool.members.get(i)?.name.clone(), r)))
        .collect()
}

/// Before a reload applies it: every pool of `next` whose login (user or
/// password) differs from the running pool of that name gets it tried on
/// its members, all at once, within the check's timeout (at most 3 s; the
/// agent's loop waits meanwhile). Rejected, naming the file and the
/// password's key, when members answered and every one refused it. A
/// login no member could be reached to try is let through, with a warning
/// returned: the running one works nowhere either. New pools are not
/// tried: they cannot break a running one, and their probes report.
pub fn vet_new_logins(
    running: &[Pool],
    next: &[Pool],
    file: &Path,
) -> Result<Vec<String>, ConfigError> {
    let changed: Vec<(usize, Pool)> = next
        .iter()
        .enumerate()
        .filter(|(_, p)| {
            running
                .iter()
                .any(|r| r.name == p.name && r.login != p.login)
        })
        .map(|(i, p)| (i, p.clone()))
        .collect();
    if changed.is_empty() {
        return Ok(Vec::new());
    }
    // The agent's loop runs on a current-thread runtime inside a sync
    // call: the tries run on a thread of their own (in the agent's
    // network namespace, which new threads inherit).
    let attempts = std::thread::scope(|scope| {
        scope
            .spawn(|| -> std::io::Result<Vec<_>> {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                Ok(rt.block_on(async {
                    let mut all = Vec::new();
                    for (i, p) in &changed {
                        all.push((*i, p, try_login(p).await));
                    }
                    all
                }))
            })
            .join()
    });
    let attempts = match attempts {
        Ok(Ok(a)) => a,
        Ok(Err(e)) => {
            return Err(ConfigError::invalid(
                file,
                "pool",
                format!("cannot try the new logins: {e}"),
            ));
        }
        Err(_) => {
            return Err(ConfigError::invalid(
                file,
                "pool",
                "trying the new logins failed",
            ));
        }
    };
    let mut warnings = Vec::new();
    for (i, pool, tries) in attempts {
        let key = format!(
            "pool[{i}].health.{}",
            if pool.login.password_file.is_some() {
                "password-file"
            } else {
                "password"
            }
        );
        match login_verdict(&tries) {
            LoginVerdict::Accepted(by) => {
                info!(pool = %pool.name, "pool {}: the new login (user {}) works on {by}", pool.name, pool.login.user);
            }
            LoginVerdict::Untried(why) => warnings.push(format!(
                "pool {}: the new login (user {}) could not be tried, no member answered: {}",
                pool.name,
                pool.login.user,
                why.join("; ")
            )),
            LoginVerdict::Refused(why) => {
                return Err(ConfigError::invalid(
                    file,
                    &key,
                    format!(
                        "the new login (user {}) of pool {} is refused by every member that \
                         answered, so the pool would lose its writer: {}",
                        pool.login.user,
                        pool.name,
                        why.join("; ")
                    ),
                ));
            }
        }
    }
    Ok(warnings)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_login_is_judged_by_the_members_that_answered() {
        use LoginFailure::{Refused, Unreachable};
        let denied = || Err(Refused("server error 1045: Access denied".into()));
        let down = || Err(Unreachable("connect: connection refused".into()));
        let v = |a: Vec<(&str, Result<(), LoginFailure>)>| {
            login_verdict(
                &a.into_iter()
                    .map(|(n, r)| (n.to_owned(), r))
                    .collect::<Vec<_>>(),
            )
        };
        assert_eq!(
            v(vec![("db1", down()), ("db2", Ok(())), ("db3", denied())]),
            LoginVerdict::Accepted("db2".into())
        );
        // db1 is down and the others refuse: rejected, with their reasons.
        assert_eq!(
            v(vec![("db1", down()), ("db2", denied()), ("db3", denied())]),
            LoginVerdict::Refused(vec![
                "server error 1045: Access denied".into(),
                "server error 1045: Access denied".into()
            ])
        );
        assert!(matches!(
            v(vec![("db1", down()), ("db2", down())]),
            LoginVerdict::Untried(why) if why.len() == 2
        ));
    }
}
