//! The systemd units in `deploy/systemd`: systemd parses them (`systemd-analyze verify`),
//! their sandbox scores at most [`MAX_EXPOSURE`] (`systemd-analyze security`), every
//! `chgate` command line in them is one the binary accepts, the paths they name lie in the
//! directories they declare, a reload is offered only where the program handles SIGHUP, a
//! stop outlasts the program's drain, and their accounts come from the sysusers file.
//!
//! Needs systemd's tools (`systemd-analyze`, `systemd-sysusers`), not a running systemd:
//! both work in a container whose PID 1 is not systemd. What they cannot show is the
//! sandbox at work; the units' comments say what was checked by hand (system calls,
//! /proc, name resolution without AF_NETLINK).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

/// The units, and the module of `src/` whose program each runs.
const UNITS: [(&str, &str); 3] = [
    ("chgate-proxy.service", "proxy"),
    ("chgate-ingest.service", "ingest"),
    ("chgate-cdc.service", "cdc"),
];

/// The highest overall exposure `systemd-analyze security` (systemd 252) may give a unit.
/// Every unit scores 1.1. What is left is what a network program needs and cannot give up:
/// Internet and local sockets, the host's network, any IP address (it talks to arbitrary
/// hosts), the host's root directory, the RTC read access ProtectClock= itself grants, and
/// /proc's non-process files (ProcSubset=pid would hide /proc/stat, which
/// process_start_time_seconds needs). Raising this needs a reason in the unit.
const MAX_EXPOSURE: f64 = 1.1;

/// Where the units expect the binary.
const INSTALLED_BINARY: &str = "/usr/local/bin/chgate";

/// How long each program may take to stop after SIGTERM, beyond which TimeoutStopSec=
/// would SIGKILL it mid-drain.
fn drain(program: &str) -> Duration {
    match program {
        // proxy.drain_timeout, then up to 2 s to leave the ZooKeeper fleet (src/proxy/mod.rs).
        "proxy" => chgate::config::ProxyConfig::default().drain_timeout + Duration::from_secs(2),
        // The writers' drain_timeout (src/ingest/mod.rs), before the commit.
        "ingest" => Duration::from_secs(30),
        // The wait for the broker's acknowledgements (src/cdc/stream.rs, `drain`).
        "cdc" => Duration::from_secs(30),
        other => panic!("no drain known for {other}"),
    }
}

fn systemd_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/systemd")
}

/// A unit file: its `Key=value` lines with their section, and its comment text.
struct Unit {
    name: &'static str,
    program: &'static str,
    path: PathBuf,
    text: String,
    entries: Vec<(String, String, String)>,
}

impl Unit {
    fn load(name: &'static str, program: &'static str) -> Unit {
        let path = systemd_dir().join(name);
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        let mut entries = Vec::new();
        let mut section = String::new();
        let mut lines = text.lines();
        while let Some(line) = lines.next() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
                continue;
            }
            if let Some(s) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                section = s.to_string();
                continue;
            }
            let mut line = line.to_string();
            while line.ends_with('\\') {
                line.pop();
                line.push(' ');
                line.push_str(lines.next().unwrap_or_default().trim());
            }
            let (key, value) = line
                .split_once('=')
                .unwrap_or_else(|| panic!("{name}: not a Key=value line: {line}"));
            entries.push((section.clone(), key.trim().into(), value.trim().into()));
        }
        Unit {
            name,
            program,
            path,
            text,
            entries,
        }
    }

    fn all() -> Vec<Unit> {
        UNITS.iter().map(|(n, p)| Unit::load(n, p)).collect()
    }

    /// Every value of `key`, in file order.
    fn values(&self, key: &str) -> Vec<&str> {
        self.entries
            .iter()
            .filter(|(_, k, _)| k == key)
            .map(|(_, _, v)| v.as_str())
            .collect()
    }

    /// The value of a key given once.
    fn value(&self, key: &str) -> Option<&str> {
        let values = self.values(key);
        assert!(
            values.len() <= 1,
            "{}: {key}= is given more than once",
            self.name
        );
        values.first().copied()
    }

    /// The Exec*= command lines, as (key, argv) with systemd's prefixes (`-`, `+`, ...) taken
    /// off the command.
    fn commands(&self) -> Vec<(&str, Vec<String>)> {
        self.entries
            .iter()
            .filter(|(s, k, _)| s == "Service" && k.starts_with("Exec"))
            .map(|(_, k, v)| {
                let mut argv: Vec<String> = v.split_whitespace().map(String::from).collect();
                argv[0] = argv[0].trim_start_matches(['-', '+', '@', '!', ':']).into();
                (k.as_str(), argv)
            })
            .collect()
    }

    /// The `--config` file of ExecStart=.
    fn config_file(&self) -> String {
        let (_, argv) = self
            .commands()
            .into_iter()
            .find(|(k, _)| *k == "ExecStart")
            .unwrap_or_else(|| panic!("{}: no ExecStart=", self.name));
        let at = argv
            .iter()
            .position(|a| a == "--config")
            .unwrap_or_else(|| panic!("{}: ExecStart= has no --config", self.name));
        argv[at + 1].clone()
    }

    /// The comment lines' text.
    fn comments(&self) -> String {
        self.text
            .lines()
            .filter_map(|l| l.trim().strip_prefix('#'))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Runs a systemd tool; one that is not installed fails the test saying so.
fn run(tool: &str, args: &[&str]) -> Output {
    match Command::new(tool).args(args).output() {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "{tool} is not installed: these tests check deploy/systemd with systemd's own tools \
             (Debian/Ubuntu: apt-get install systemd; no running systemd is needed)"
        ),
        Err(e) => panic!("cannot run {tool}: {e}"),
    }
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A fresh directory of this test's own.
fn scratch(test: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("deploy_systemd")
        .join(test);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The absolute paths in `text` that start with `prefix`, up to the first character that
/// cannot be part of one.
fn paths_under(text: &str, prefix: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find(prefix) {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | ')' | ',' | '`'))
            .unwrap_or(tail.len());
        found.insert(tail[..end].trim_end_matches(['.', ':', ';']).to_string());
        rest = &tail[prefix.len()..];
    }
    found
}

fn is_within(path: &str, dir: &str) -> bool {
    path == dir || path.starts_with(&format!("{dir}/"))
}

/// `systemd-analyze verify` complains when ExecStart='s binary is missing, so each unit is
/// verified as a copy that runs the binary this test was built with.
#[test]
fn units_pass_systemd_analyze_verify() {
    let dir = scratch("verify");
    let mut files = Vec::new();
    for unit in Unit::all() {
        assert!(
            unit.text.contains(INSTALLED_BINARY),
            "{}: does not run {INSTALLED_BINARY}",
            unit.name
        );
        let copy = dir.join(unit.name);
        std::fs::write(
            &copy,
            unit.text
                .replace(INSTALLED_BINARY, env!("CARGO_BIN_EXE_chgate")),
        )
        .unwrap();
        files.push(copy.display().to_string());
    }
    let args: Vec<&str> = ["verify"]
        .into_iter()
        .chain(files.iter().map(String::as_str))
        .collect();
    let out = run("systemd-analyze", &args);
    let output = text(&out);
    println!("systemd-analyze verify:\n{output}");
    let dir_text = dir.display().to_string();
    let complaints: Vec<&str> = output
        .lines()
        .filter(|l| l.contains(&dir_text) || UNITS.iter().any(|(name, _)| l.contains(name)))
        .collect();
    assert!(
        complaints.is_empty() && out.status.success(),
        "systemd-analyze verify complains ({}):\n{}",
        out.status,
        complaints.join("\n")
    );
}

#[test]
fn units_score_at_most_the_max_exposure() {
    let mut scores = Vec::new();
    for unit in Unit::all() {
        let path = unit.path.display().to_string();
        let out = run("systemd-analyze", &["security", "--offline=true", &path]);
        let output = text(&out);
        assert!(
            out.status.success(),
            "systemd-analyze security {}: {}\n{output}",
            unit.name,
            out.status
        );
        // The offline load reports what it could not parse, as `verify` does.
        let stderr = String::from_utf8_lossy(&out.stderr);
        let complaints: Vec<&str> = stderr.lines().filter(|l| l.contains(unit.name)).collect();
        assert!(
            complaints.is_empty(),
            "{}: systemd-analyze security complains:\n{}",
            unit.name,
            complaints.join("\n")
        );
        let marker = format!("Overall exposure level for {}: ", unit.name);
        let score: f64 = output
            .lines()
            .find_map(|l| l.split_once(&marker).map(|(_, rest)| rest))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{}: no exposure level in:\n{output}", unit.name));
        println!("{}: exposure {score}", unit.name);
        if score > MAX_EXPOSURE {
            println!("{output}");
        }
        scores.push((unit.name, score));
    }
    for (name, score) in scores {
        assert!(
            score <= MAX_EXPOSURE,
            "{name}: exposure {score} > {MAX_EXPOSURE} (the table is printed above)"
        );
    }
}

/// One `chgate --help` page: its subcommands, options (and whether each takes a value) and
/// positional arguments.
struct Help {
    commands: BTreeSet<String>,
    options: Vec<(String, bool)>,
    required: usize,
    optional: usize,
}

fn help(words: &[&str]) -> Help {
    let out = Command::new(env!("CARGO_BIN_EXE_chgate"))
        .args(words)
        .arg("--help")
        .output()
        .unwrap();
    let page = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "chgate {} --help: {}\n{page}{}",
        words.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let mut help = Help {
        commands: BTreeSet::new(),
        options: Vec::new(),
        required: 0,
        optional: 0,
    };
    let mut section = "";
    for line in page.lines() {
        if !line.starts_with(' ') {
            section = line.trim_end_matches(':');
            continue;
        }
        let Some(first) = line.split_whitespace().next() else {
            continue;
        };
        match section {
            "Commands" => {
                help.commands.insert(first.to_string());
            }
            "Arguments" if first.starts_with('<') => help.required += 1,
            "Arguments" => help.optional += 1,
            "Options" => {
                let mut tokens = line.split_whitespace();
                while let Some(t) = tokens.next() {
                    if let Some(flag) = t.strip_prefix("--") {
                        let takes = tokens.next().is_some_and(|v| v.starts_with('<'));
                        help.options
                            .push((format!("--{}", flag.trim_end_matches(',')), takes));
                        break;
                    }
                }
            }
            _ => {}
        }
    }
    help
}

#[test]
fn every_chgate_command_line_parses() {
    let mut checked = 0;
    for unit in Unit::all() {
        for (key, argv) in unit.commands() {
            if argv[0] != INSTALLED_BINARY {
                continue;
            }
            let line = format!("{}: {key}={}", unit.name, argv.join(" "));
            // The subcommands, as far as each help page lists them.
            let mut words: Vec<&str> = Vec::new();
            let mut page = help(&words);
            let mut rest = &argv[1..];
            while let Some(next) = rest.first() {
                if !page.commands.contains(next.as_str()) {
                    break;
                }
                words.push(next);
                rest = &rest[1..];
                page = help(&words);
            }
            assert!(!words.is_empty(), "{line}: no chgate subcommand");
            let mut positional = 0;
            let mut tokens = rest.iter();
            while let Some(t) = tokens.next() {
                if !t.starts_with('-') {
                    positional += 1;
                    continue;
                }
                let (flag, inline) = match t.split_once('=') {
                    Some((f, _)) => (f, true),
                    None => (t.as_str(), false),
                };
                let (_, takes) =
                    page.options
                        .iter()
                        .find(|(f, _)| f == flag)
                        .unwrap_or_else(|| {
                            panic!("{line}: `chgate {} --help` has no {flag}", words.join(" "))
                        });
                if *takes && !inline {
                    assert!(tokens.next().is_some(), "{line}: {flag} needs a value");
                }
            }
            assert!(
                (page.required..=page.required + page.optional).contains(&positional),
                "{line}: {positional} arguments, `chgate {} --help` takes {} (+{} optional)",
                words.join(" "),
                page.required,
                page.optional
            );
            checked += 1;
        }
    }
    // ExecStartPre and ExecStart in each, ExecReload's check in the proxy's.
    assert!(checked >= 7, "only {checked} chgate command lines found");
}

#[test]
fn paths_lie_in_the_declared_directories() {
    for unit in Unit::all() {
        let name = unit.name;
        let conf = format!(
            "/etc/{}",
            unit.value("ConfigurationDirectory")
                .unwrap_or_else(|| panic!("{name}: no ConfigurationDirectory="))
        );
        let config = unit.config_file();
        assert!(
            is_within(&config, &conf),
            "{name}: --config {config} is not in ConfigurationDirectory {conf}"
        );
        // The check before a start (and before a reload) is of the file the program runs with.
        for (key, argv) in unit.commands() {
            if argv[0] == INSTALLED_BINARY && argv[1..3] == ["config", "check"] {
                assert_eq!(argv[3], config, "{name}: {key}= checks another file");
            }
        }
        assert!(
            unit.commands()
                .iter()
                .any(|(k, a)| *k == "ExecStartPre" && a[1..3] == ["config", "check"]),
            "{name}: no ExecStartPre= config check"
        );
        for file in unit.values("EnvironmentFile") {
            let file = file.trim_start_matches('-');
            assert!(
                is_within(file, &conf),
                "{name}: EnvironmentFile {file} not in {conf}"
            );
        }
        // /etc paths named anywhere (the install lines included) are the config directory's,
        // or systemd's own.
        for p in paths_under(&unit.text, "/etc/") {
            assert!(
                is_within(&p, &conf)
                    || p.starts_with("/etc/systemd/")
                    || p.starts_with("/etc/sysusers.d/"),
                "{name}: {p} is outside {conf}"
            );
        }

        // Credentials: loaded from the config directory's secrets, and the paths the
        // comments give the config are where systemd puts them for this unit.
        let credentials: Vec<(&str, &str)> = unit
            .values("LoadCredential")
            .into_iter()
            .map(|v| {
                v.split_once(':')
                    .unwrap_or_else(|| panic!("{name}: LoadCredential={v} names no file"))
            })
            .collect();
        assert!(!credentials.is_empty(), "{name}: no LoadCredential=");
        for (_, source) in &credentials {
            assert!(
                is_within(source, &format!("{conf}/secrets")),
                "{name}: credentials from {source}, not from {conf}/secrets"
            );
        }
        let run_dir = format!("/run/credentials/{name}");
        let named = paths_under(&unit.text, "/run/credentials/");
        assert!(
            !named.is_empty(),
            "{name}: the comments do not say where secrets are"
        );
        for p in named {
            let id = p
                .strip_prefix(&format!("{run_dir}/"))
                .unwrap_or_else(|| panic!("{name}: {p} is not in {run_dir}"));
            // A directory's files arrive as ID_FILENAME.
            assert!(
                credentials
                    .iter()
                    .any(|(c, _)| id == *c || id.starts_with(&format!("{c}_"))),
                "{name}: {p} is no credential LoadCredential= gives"
            );
        }

        // Writable state: the state directory, and every /var/lib path the unit names is in it.
        let state = unit
            .value("StateDirectory")
            .map(|s| format!("/var/lib/{s}"));
        for p in paths_under(&unit.text, "/var/lib/") {
            let state = state
                .as_deref()
                .unwrap_or_else(|| panic!("{name}: names {p} but declares no StateDirectory="));
            assert!(
                is_within(&p, state),
                "{name}: {p} is outside StateDirectory {state}"
            );
        }
        for p in unit.values("RequiresMountsFor") {
            assert_eq!(Some(p), state.as_deref(), "{name}: RequiresMountsFor={p}");
        }
        let comments = unit.comments();
        let expect = |key: &str| {
            let state = state
                .as_deref()
                .unwrap_or_else(|| panic!("{name}: {key} needs a StateDirectory="));
            let line = format!("{key} = \"{state}");
            assert!(
                comments.contains(&line),
                "{name}: the comments do not set {key} inside {state}"
            );
        };
        match unit.program {
            // The config cache, with [config_source].
            "proxy" => expect("cache_file"),
            // The capture's store is required.
            "cdc" => expect("state_dir"),
            _ => {}
        }
    }
}

/// A program that does not handle SIGHUP dies of it (its default action): only one that
/// does may have ExecReload=. Which do is read from their source: `signals::reloads()`.
#[test]
fn reload_only_where_sighup_is_handled() {
    fn calls_reloads(dir: &Path) -> bool {
        std::fs::read_dir(dir).unwrap().any(|e| {
            let path = e.unwrap().path();
            if path.is_dir() {
                calls_reloads(&path)
            } else {
                path.extension().is_some_and(|x| x == "rs")
                    && std::fs::read_to_string(&path)
                        .unwrap()
                        .contains("signals::reloads()")
            }
        })
    }
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    for unit in Unit::all() {
        let handles = calls_reloads(&src.join(unit.program));
        let reloads = unit.values("ExecReload");
        assert_eq!(
            !reloads.is_empty(),
            handles,
            "{}: ExecReload= {:?}, while chgate {} {} SIGHUP",
            unit.name,
            reloads,
            unit.program,
            if handles {
                "handles"
            } else {
                "does not handle"
            }
        );
        if handles {
            assert_eq!(
                reloads.last().copied(),
                Some("/bin/kill -HUP $MAINPID"),
                "{}: a reload ends with SIGHUP to the main process",
                unit.name
            );
        }
    }
}

#[test]
fn stop_timeout_outlasts_the_drain() {
    for unit in Unit::all() {
        assert_eq!(unit.value("KillSignal"), Some("SIGTERM"), "{}", unit.name);
        let timeout = unit
            .value("TimeoutStopSec")
            .unwrap_or_else(|| panic!("{}: no TimeoutStopSec=", unit.name));
        let secs: u64 = timeout.parse().unwrap_or_else(|_| {
            panic!(
                "{}: TimeoutStopSec={timeout}: write whole seconds",
                unit.name
            )
        });
        let drain = drain(unit.program);
        assert!(
            Duration::from_secs(secs) > drain,
            "{}: TimeoutStopSec={secs} does not outlast the {drain:?} drain",
            unit.name
        );
    }
}

#[test]
fn accounts_come_from_the_sysusers_file() {
    let file = systemd_dir().join("chgate.sysusers.conf");
    let conf = std::fs::read_to_string(&file).unwrap();
    let mut users = Vec::new();
    let mut groups = BTreeSet::new();
    for line in conf.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields[..] {
            ["g", group, ..] => {
                groups.insert(group.to_string());
            }
            ["u", user, id, ..] => users.push((user.to_string(), id.to_string())),
            _ => panic!("chgate.sysusers.conf: unexpected line: {line}"),
        }
    }
    for unit in Unit::all() {
        let user = unit
            .value("User")
            .unwrap_or_else(|| panic!("{}: no User=", unit.name));
        let group = unit
            .value("Group")
            .unwrap_or_else(|| panic!("{}: no Group=", unit.name));
        assert!(
            groups.contains(group),
            "{}: group {group} is not in {}",
            unit.name,
            file.display()
        );
        let (_, id) = users
            .iter()
            .find(|(u, _)| u == user)
            .unwrap_or_else(|| panic!("{}: user {user} is not in {}", unit.name, file.display()));
        // The group that may read /etc/chgate is the user's primary one.
        assert!(
            id.ends_with(&format!(":{group}")),
            "{}: {user}'s group is not {group}",
            unit.name
        );
        assert_eq!(
            unit.value("DynamicUser"),
            None,
            "{}: DynamicUser= with a sysusers account",
            unit.name
        );
    }

    // systemd-sysusers itself creates them in an empty root.
    let root = scratch("sysusers");
    std::fs::create_dir_all(root.join("etc/sysusers.d")).unwrap();
    std::fs::copy(&file, root.join("etc/sysusers.d/chgate.conf")).unwrap();
    let out = run("systemd-sysusers", &[&format!("--root={}", root.display())]);
    assert!(
        out.status.success(),
        "systemd-sysusers: {}\n{}",
        out.status,
        text(&out)
    );
    let passwd = std::fs::read_to_string(root.join("etc/passwd")).unwrap();
    let group_file = std::fs::read_to_string(root.join("etc/group")).unwrap();
    for unit in Unit::all() {
        let group = unit.value("Group").unwrap();
        let gid = group_file
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{group}:x:")))
            .and_then(|rest| rest.split(':').next())
            .unwrap_or_else(|| panic!("no group {group} in:\n{group_file}"));
        let user = unit.value("User").unwrap();
        let entry = passwd
            .lines()
            .find(|l| l.starts_with(&format!("{user}:")))
            .unwrap_or_else(|| panic!("no user {user} in:\n{passwd}"));
        assert_eq!(
            entry.split(':').nth(3),
            Some(gid),
            "{user}'s primary group: {entry}"
        );
    }
}
