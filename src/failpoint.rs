//! Failpoints: named places in the code where a test can have the process die or wait, to
//! put a crash or a race exactly where a proof needs it (between an insert and the record
//! that says it is done, say) instead of hoping a timed SIGKILL lands there.
//!
//! They are off unless the environment variable `CHGATE_FAILPOINTS` names some, read once:
//! `name=action` pairs split by `;`, where an action is `kill` (SIGKILL to this process: no
//! unwinding, no flush, as `kill -9` would) or `sleep(MS)` (the task waits MS milliseconds).
//! An unknown action is logged once and ignored. With the variable unset, a
//! failpoint costs one load of an initialized `OnceLock`.
//!
//! Names in use: `ingest.inserted` (a segment's rows are in ClickHouse, its done record not
//! yet written), `ingest.replay` (a writer is about to insert a segment rebuilt from a
//! pending intent), `cdc.truncate_sliced` (the capture committed a slice of a truncate's
//! deletes, more of them to come), `cdc.snapshot_chunk` (the capture applied a snapshot
//! chunk: a test slows the snapshot down with `sleep` to act in the middle of it).

use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::Duration;

/// What a failpoint does when reached.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Action {
    Kill,
    Sleep(Duration),
}

fn table() -> &'static HashMap<String, Action> {
    static TABLE: OnceLock<HashMap<String, Action>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let Ok(spec) = std::env::var("CHGATE_FAILPOINTS") else {
            return HashMap::new();
        };
        let (table, errors) = parse(&spec);
        for e in errors {
            tracing::error!(error = %e, "CHGATE_FAILPOINTS: ignored");
        }
        table
    })
}

/// Parses `name=action;...`: the failpoints, and what could not be read.
pub fn parse(spec: &str) -> (HashMap<String, Action>, Vec<String>) {
    let mut table = HashMap::new();
    let mut errors = Vec::new();
    for item in spec.split(';').map(str::trim).filter(|s| !s.is_empty()) {
        let Some((name, action)) = item.split_once('=') else {
            errors.push(format!("{item:?} is not name=action"));
            continue;
        };
        let action = action.trim();
        let parsed = match action {
            "kill" => Some(Action::Kill),
            _ => action
                .strip_prefix("sleep(")
                .and_then(|rest| rest.strip_suffix(')'))
                .and_then(|ms| ms.trim().parse().ok())
                .map(|ms| Action::Sleep(Duration::from_millis(ms))),
        };
        match parsed {
            Some(a) => {
                table.insert(name.trim().to_string(), a);
            }
            None => errors.push(format!(
                "{action:?} (for {name}) is neither kill nor sleep(MS)"
            )),
        }
    }
    (table, errors)
}

/// Reaches the failpoint `name`: dies or waits if the environment says so.
pub async fn reach(name: &str) {
    if let Some(d) = reach_now(name) {
        tokio::time::sleep(d).await;
    }
}

/// [`reach`] where nothing may await (between two steps that must not be torn apart by
/// anything but the failpoint): dies at once, or returns the time to sleep.
pub fn reach_now(name: &str) -> Option<std::time::Duration> {
    let table = table();
    if table.is_empty() {
        return None;
    }
    match table.get(name) {
        None => None,
        Some(Action::Kill) => {
            tracing::warn!(failpoint = name, "Failpoint: SIGKILL");
            // SAFETY: kill(2) on our own pid with a valid signal number.
            unsafe {
                libc::kill(libc::getpid(), libc::SIGKILL);
            }
            None
        }
        Some(Action::Sleep(d)) => {
            tracing::warn!(
                failpoint = name,
                ms = d.as_millis() as u64,
                "Failpoint: sleeping"
            );
            Some(*d)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failpoints_are_read_from_their_spec() {
        let (t, errors) = parse("ingest.inserted=kill; ingest.replay = sleep(3000);;");
        assert_eq!(t.get("ingest.inserted"), Some(&Action::Kill));
        assert_eq!(
            t.get("ingest.replay"),
            Some(&Action::Sleep(Duration::from_secs(3)))
        );
        assert!(errors.is_empty(), "{errors:?}");
        let (t, errors) = parse("a=explode;b;c=sleep(x)");
        assert!(t.is_empty());
        assert_eq!(errors.len(), 3, "{errors:?}");
    }
}
