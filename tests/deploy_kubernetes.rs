//! `deploy/kubernetes`, checked offline (no cluster, no docker):
//!
//! - every kustomization renders (`kubectl kustomize`, or a standalone `kustomize build`)
//!   and every object validates against the Kubernetes schemas (`kubernetes-validate
//!   --strict`, from the venv `scripts/dev-stack` makes), custom resources by hand;
//! - every chgate config in a ConfigMap passes chgate's own checks with the files its pod
//!   mounts: Secrets written out from `secrets-example/`, ConfigMaps, volumes; a proxy's and
//!   an ingest sidecar's ZooKeeper config merged with the file the push Job publishes;
//! - ports, probes, Services and every host name in a config agree with the listeners, the
//!   admin server's routes and the objects of the render; the ClickHouse and ZooKeeper
//!   examples agree with the cluster chgate publishes to them;
//! - images are `chgate:<this version>` and the Dockerfile builds that binary; secrets stay
//!   in Secrets and every reference resolves; metric names exist in `src/metrics.rs`;
//!   every container runs non-root, read-only, without capabilities, with requests.
//!
//! Tools: `kubectl` (or `kustomize` on PATH or in `~/.cache/chgate/tools/bin`) and
//! `~/.cache/chgate/venv` with kubernetes-validate and PyYAML (`scripts/dev-stack up`).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use base64::Engine as _;
use serde_json::Value;

const VERSION: &str = env!("CARGO_PKG_VERSION");
const CHGATE: &str = env!("CARGO_BIN_EXE_chgate");
/// What a cluster runs: one render each, every reference inside it resolved.
const LAYOUTS: [&str; 2] = [".", "sidecar"];
/// The Secrets the layouts mount, as an example (not part of the layouts).
const SECRETS: &str = "secrets-example";
/// Custom resources (optional extras) kubernetes-validate has no schema for.
const CUSTOM_KINDS: [(&str, &str); 2] = [
    ("keda.sh/v1alpha1", "ScaledObject"),
    ("monitoring.coreos.com/v1", "PodMonitor"),
];
/// The oldest Kubernetes the manifests claim (the proxy's preStop `sleep` action is 1.30's);
/// they are also validated against the newest the installed kubernetes-validate knows.
const OLDEST_KUBERNETES: &str = "1.30.0";
/// The admin routes a probe may use: the ones the bearer token does not guard.
const TOKEN_FREE: [&str; 2] = ["/healthz", "/readyz"];
/// The non-root user of the image (deploy/docker/Dockerfile) and of every chgate pod.
const CHGATE_UID: u64 = 65532;

// ---------------------------------------------------------------------------------------
// Tools and renders
// ---------------------------------------------------------------------------------------

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn kube_dir() -> PathBuf {
    repo().join("deploy/kubernetes")
}

fn cache_dir() -> PathBuf {
    match std::env::var_os("CHGATE_CACHE_DIR") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(std::env::var_os("HOME").expect("HOME is set")).join(".cache/chgate"),
    }
}

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// `kubectl kustomize DIR`, else `kustomize build DIR`.
fn render_command(dir: &Path) -> Command {
    if let Some(kubectl) = on_path("kubectl") {
        let mut c = Command::new(kubectl);
        c.arg("kustomize").arg(dir);
        return c;
    }
    let standalone = on_path("kustomize").or_else(|| {
        let p = cache_dir().join("tools/bin/kustomize");
        p.is_file().then_some(p)
    });
    match standalone {
        Some(k) => {
            let mut c = Command::new(k);
            c.arg("build").arg(dir);
            c
        }
        None => panic!(
            "neither kubectl nor kustomize found (PATH, {}): scripts/dev-stack up installs kustomize",
            cache_dir().join("tools/bin").display()
        ),
    }
}

/// A program of the venv `scripts/dev-stack up` makes.
fn venv_tool(name: &str) -> PathBuf {
    let p = cache_dir().join("venv/bin").join(name);
    assert!(
        p.is_file(),
        "{} is missing: run scripts/dev-stack up (its venv has kubernetes-validate and PyYAML), \
         or {}/venv/bin/pip install kubernetes-validate",
        p.display(),
        cache_dir().display()
    );
    p
}

fn run(cmd: &mut Command, stdin: Option<&str>) -> (bool, String, String) {
    use std::io::Write;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let mut input = child.stdin.take().expect("stdin");
    let text = stdin.unwrap_or("").to_string();
    let writer = std::thread::spawn(move || input.write_all(text.as_bytes()));
    let out = child.wait_with_output().expect("wait");
    writer.join().expect("writer").expect("write stdin");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

struct Rendered {
    /// Relative to deploy/kubernetes ("." for the top).
    dir: String,
    yaml: String,
    objects: Vec<Value>,
}

/// Every directory under deploy/kubernetes with a kustomization, relative.
fn kustomization_dirs() -> Vec<String> {
    fn walk(dir: &Path, base: &Path, out: &mut Vec<String>) {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.expect("entry").path())
            .collect();
        entries.sort();
        if ["kustomization.yaml", "kustomization.yml", "Kustomization"]
            .iter()
            .any(|f| dir.join(f).is_file())
        {
            let rel = dir.strip_prefix(base).expect("under base");
            out.push(if rel.as_os_str().is_empty() {
                ".".into()
            } else {
                rel.display().to_string()
            });
        }
        for e in entries.iter().filter(|e| e.is_dir()) {
            walk(e, base, out);
        }
    }
    let mut out = Vec::new();
    walk(&kube_dir(), &kube_dir(), &mut out);
    out
}

/// Multi-document YAML to JSON values, by PyYAML (the venv's).
fn yaml_to_json(yaml: &str) -> Vec<Value> {
    let script = "import sys, json, yaml\n\
                  for d in yaml.safe_load_all(sys.stdin):\n    \
                  if d: print(json.dumps(d))\n";
    let (ok, out, err) = run(
        Command::new(venv_tool("python")).args(["-c", script]),
        Some(yaml),
    );
    assert!(ok, "PyYAML could not read the render: {err}");
    out.lines()
        .map(|l| serde_json::from_str(l).expect("JSON from PyYAML"))
        .collect()
}

fn renders() -> &'static BTreeMap<String, Rendered> {
    static RENDERS: OnceLock<BTreeMap<String, Rendered>> = OnceLock::new();
    RENDERS.get_or_init(|| {
        kustomization_dirs()
            .into_iter()
            .map(|dir| {
                let (ok, yaml, err) = run(&mut render_command(&kube_dir().join(&dir)), None);
                assert!(ok, "deploy/kubernetes/{dir} does not render: {err}");
                let objects = yaml_to_json(&yaml);
                assert!(
                    !objects.is_empty(),
                    "deploy/kubernetes/{dir} renders nothing"
                );
                (dir.clone(), Rendered { dir, yaml, objects })
            })
            .collect()
    })
}

fn rendered(dir: &str) -> &'static Rendered {
    renders()
        .get(dir)
        .unwrap_or_else(|| panic!("no kustomization deploy/kubernetes/{dir}"))
}

// ---------------------------------------------------------------------------------------
// Reading objects
// ---------------------------------------------------------------------------------------

fn text<'a>(v: &'a Value, pointer: &str) -> &'a str {
    v.pointer(pointer).and_then(Value::as_str).unwrap_or("")
}

fn list<'a>(v: &'a Value, pointer: &str) -> &'a [Value] {
    v.pointer(pointer)
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

fn string_map(v: Option<&Value>) -> BTreeMap<String, String> {
    v.and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect()
        })
        .unwrap_or_default()
}

fn kind_name(o: &Value) -> String {
    format!("{}/{}", text(o, "/kind"), text(o, "/metadata/name"))
}

fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> Option<&'a Value> {
    objects
        .iter()
        .find(|o| text(o, "/kind") == kind && text(o, "/metadata/name") == name)
}

/// A pod template and what owns it.
#[derive(Clone)]
struct Workload<'a> {
    kind: &'a str,
    name: &'a str,
    labels: BTreeMap<String, String>,
    pod: &'a Value,
    replicas: Option<u64>,
    service_name: &'a str,
    /// A StatefulSet's volumeClaimTemplates.
    claims: Vec<&'a str>,
}

impl Workload<'_> {
    fn id(&self) -> String {
        format!("{}/{}", self.kind, self.name)
    }
}

fn workloads(objects: &[Value]) -> Vec<Workload<'_>> {
    objects
        .iter()
        .filter_map(|o| {
            let template = match text(o, "/kind") {
                "Deployment" | "StatefulSet" | "DaemonSet" | "Job" | "ReplicaSet" => {
                    o.pointer("/spec/template")?
                }
                "CronJob" => o.pointer("/spec/jobTemplate/spec/template")?,
                _ => return None,
            };
            Some(Workload {
                kind: o["kind"].as_str()?,
                name: o["metadata"]["name"].as_str()?,
                labels: string_map(template.pointer("/metadata/labels")),
                pod: template.get("spec")?,
                replicas: o.pointer("/spec/replicas").and_then(Value::as_u64),
                service_name: text(o, "/spec/serviceName"),
                claims: list(o, "/spec/volumeClaimTemplates")
                    .iter()
                    .map(|c| text(c, "/metadata/name"))
                    .collect(),
            })
        })
        .collect()
}

fn containers(pod: &Value) -> impl Iterator<Item = &Value> {
    list(pod, "/containers")
        .iter()
        .chain(list(pod, "/initContainers"))
}

fn is_chgate(c: &Value) -> bool {
    text(c, "/image").split(':').next() == Some("chgate")
}

fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// A ConfigMap's or Secret's keys with their text (Secret `data` decoded).
fn object_data(o: &Value) -> BTreeMap<String, String> {
    let mut out = string_map(o.get("stringData"));
    for (k, v) in string_map(o.get("data")) {
        let value = if text(o, "/kind") == "Secret" {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(v.as_bytes())
                .unwrap_or_else(|e| panic!("{}: {k}: {e}", kind_name(o)));
            String::from_utf8(bytes).expect("UTF-8 secret")
        } else {
            v
        };
        out.insert(k, value);
    }
    out
}

/// The files a configMap, secret or projected volume holds (`items` applied); `None` for
/// volumes without content (emptyDir, persistentVolumeClaim). ConfigMaps come from the
/// layout, Secrets from secrets-example/.
fn volume_files(layout: &[Value], volume: &Value) -> Option<BTreeMap<String, String>> {
    fn source(
        layout: &[Value],
        kind: &str,
        name: &str,
        items: &[Value],
    ) -> BTreeMap<String, String> {
        let objects = if kind == "Secret" {
            &rendered(SECRETS).objects
        } else {
            layout
        };
        let o = find(objects, kind, name)
            .unwrap_or_else(|| panic!("{kind} {name} is not in the render"));
        let mut data = object_data(o);
        if text(o, "/type") == "kubernetes.io/tls" {
            let (cert, key) = self_signed();
            data.insert("tls.crt".into(), cert.clone());
            data.insert("tls.key".into(), key.clone());
        }
        if items.is_empty() {
            return data;
        }
        items
            .iter()
            .map(|i| {
                let key = text(i, "/key");
                let value = data
                    .get(key)
                    .unwrap_or_else(|| panic!("{kind} {name} has no key {key}"));
                (text(i, "/path").to_string(), value.clone())
            })
            .collect()
    }
    if let Some(cm) = volume.get("configMap") {
        return Some(source(
            layout,
            "ConfigMap",
            text(cm, "/name"),
            list(cm, "/items"),
        ));
    }
    if let Some(s) = volume.get("secret") {
        return Some(source(
            layout,
            "Secret",
            text(s, "/secretName"),
            list(s, "/items"),
        ));
    }
    if let Some(p) = volume.get("projected") {
        let mut all = BTreeMap::new();
        for s in list(p, "/sources") {
            let part = if let Some(cm) = s.get("configMap") {
                source(layout, "ConfigMap", text(cm, "/name"), list(cm, "/items"))
            } else if let Some(sec) = s.get("secret") {
                source(layout, "Secret", text(sec, "/name"), list(sec, "/items"))
            } else {
                panic!("projected source {s} is not checked here");
            };
            all.extend(part);
        }
        return Some(all);
    }
    None
}

fn pod_volume<'a>(pod: &'a Value, name: &str) -> Option<&'a Value> {
    list(pod, "/volumes")
        .iter()
        .find(|v| text(v, "/name") == name)
}

/// The text of the file at `path` in a container, from the ConfigMap or Secret mounted there.
fn file_in_container(layout: &[Value], pod: &Value, c: &Value, path: &str) -> Option<String> {
    let mount = list(c, "/volumeMounts")
        .iter()
        .filter(|m| {
            let mp = text(m, "/mountPath");
            path == mp || path.starts_with(&format!("{mp}/"))
        })
        .max_by_key(|m| text(m, "/mountPath").len())?;
    let files = volume_files(layout, pod_volume(pod, text(mount, "/name"))?)?;
    let sub = text(mount, "/subPath");
    if !sub.is_empty() {
        return (path == text(mount, "/mountPath"))
            .then(|| files.get(sub).cloned())
            .flatten();
    }
    let rest = path[text(mount, "/mountPath").len()..].trim_start_matches('/');
    files.get(rest).cloned()
}

/// The `--config` (and `--file`) a chgate container runs with, and its role.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Role {
    Proxy,
    Ingest,
    Cdc,
    Push,
}

fn arg_after<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
}

fn role(c: &Value) -> (Role, String, Option<String>) {
    let args: Vec<String> = list(c, "/args")
        .iter()
        .map(|a| a.as_str().unwrap_or_default().to_string())
        .collect();
    let role = match args.first().map(String::as_str) {
        Some("proxy") => Role::Proxy,
        Some("ingest") => Role::Ingest,
        Some("cdc") => Role::Cdc,
        Some("config") if args.get(1).map(String::as_str) == Some("push") => Role::Push,
        other => panic!("a chgate container runs {other:?}: not a role this test knows"),
    };
    let config = arg_after(&args, "--config")
        .unwrap_or_else(|| panic!("{args:?} has no --config"))
        .to_string();
    let file = arg_after(&args, "--file").map(str::to_string);
    (role, config, file)
}

/// The chgate containers of a render, with their pod and config.
struct Chgate<'a> {
    workload: Workload<'a>,
    container: &'a Value,
    role: Role,
    config_path: String,
    /// The config text as its ConfigMap holds it.
    config: String,
    push_file: Option<String>,
}

impl Chgate<'_> {
    fn id(&self) -> String {
        format!(
            "{} container {}",
            self.workload.id(),
            text(self.container, "/name")
        )
    }
}

fn chgates(objects: &[Value]) -> Vec<Chgate<'_>> {
    let mut out = Vec::new();
    for w in workloads(objects) {
        for c in containers(w.pod).filter(|c| is_chgate(c)) {
            let (role, config_path, push_file) = role(c);
            let config = file_in_container(objects, w.pod, c, &config_path).unwrap_or_else(|| {
                panic!(
                    "{} container {}: {config_path} is not in a mounted ConfigMap",
                    w.id(),
                    text(c, "/name")
                )
            });
            out.push(Chgate {
                workload: w.clone(),
                container: c,
                role,
                config_path,
                config,
                push_file,
            });
        }
    }
    out
}

/// The dynamic config the push Job publishes (its `--file`), and the bootstrap it pushes with.
fn pushed(objects: &[Value]) -> (String, String) {
    let push: Vec<Chgate> = chgates(objects)
        .into_iter()
        .filter(|c| c.role == Role::Push)
        .collect();
    assert_eq!(push.len(), 1, "one config push Job per layout");
    let p = &push[0];
    let file = p.push_file.as_deref().expect("push has --file");
    let cluster = file_in_container(objects, p.workload.pod, p.container, file)
        .unwrap_or_else(|| panic!("{}: {file} is not in a mounted ConfigMap", p.id()));
    (p.config.clone(), cluster)
}

fn toml_table(text: &str, what: &str) -> toml::Table {
    toml::from_str(text).unwrap_or_else(|e| panic!("{what}: {e}"))
}

/// A proxy bootstrap merged with the pushed file: the whole config a proxy validates.
fn merged_proxy(bootstrap: &str, cluster: &str) -> toml::Table {
    let mut merged = toml_table(bootstrap, "bootstrap");
    merged.remove("config_source");
    for (k, v) in toml_table(cluster, "pushed file") {
        assert!(merged.insert(k.clone(), v).is_none(), "{k} in both files");
    }
    merged
}

/// An ingest file with `[config_source]` given the clusters (and `[upstream]`, `[picker]`)
/// of the pushed file, as the sidecar does at start.
fn merged_ingest(ingest: &str, cluster: &str) -> toml::Table {
    let mut merged = toml_table(ingest, "ingest file");
    merged.remove("config_source");
    let pushed = toml_table(cluster, "pushed file");
    for k in ["clusters", "upstream", "picker"] {
        if let Some(v) = pushed.get(k) {
            merged.insert(k.into(), v.clone());
        }
    }
    merged
}

fn typed_proxy(bootstrap: &str, cluster: &str) -> chgate::config::Config {
    toml::Value::Table(merged_proxy(bootstrap, cluster))
        .try_into()
        .expect("the merged proxy config parses")
}

// ---------------------------------------------------------------------------------------
// A pod's files, on disk
// ---------------------------------------------------------------------------------------

/// A self-signed certificate and key (PEM) for the TLS Secrets, made once with openssl.
fn self_signed() -> &'static (String, String) {
    static PAIR: OnceLock<(String, String)> = OnceLock::new();
    PAIR.get_or_init(|| {
        let dir = scratch("tls");
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        let status = Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            ])
            .args([
                "-subj",
                "/CN=chgate",
                "-addext",
                "subjectAltName=DNS:chgate",
            ])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .stderr(Stdio::null())
            .status()
            .expect("openssl is installed");
        assert!(status.success(), "openssl req failed");
        let pair = (
            std::fs::read_to_string(cert).expect("cert"),
            std::fs::read_to_string(key).expect("key"),
        );
        let _ = std::fs::remove_dir_all(&dir);
        pair
    })
}

fn scratch(name: &str) -> PathBuf {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "chgate-k8s-{}-{name}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// A container's mounts laid out under a scratch directory: ConfigMap and Secret files
/// written, emptyDir and volume claims as empty directories.
struct PodFs {
    root: PathBuf,
    /// mountPath, writable.
    mounts: Vec<(String, bool)>,
    /// The names of the container's environment variables.
    env: BTreeSet<String>,
}

impl PodFs {
    fn build(layout: &[Value], w: &Workload, c: &Value) -> PodFs {
        let root = scratch(&format!("{}-{}", w.name, text(c, "/name")));
        let mut mounts = Vec::new();
        for m in list(c, "/volumeMounts") {
            let (name, path) = (text(m, "/name"), text(m, "/mountPath"));
            let target = root.join(path.trim_start_matches('/'));
            let read_only = m.get("readOnly").and_then(Value::as_bool).unwrap_or(false);
            let files = match pod_volume(w.pod, name) {
                Some(v) => volume_files(layout, v),
                None if w.claims.contains(&name) => None,
                None => panic!("{}: volumeMount {name} has no volume", w.id()),
            };
            let sub = text(m, "/subPath");
            match files {
                Some(files) if !sub.is_empty() => {
                    std::fs::create_dir_all(target.parent().expect("parent")).expect("mkdir");
                    let content = files
                        .get(sub)
                        .unwrap_or_else(|| panic!("{}: subPath {sub} not in {name}", w.id()));
                    std::fs::write(&target, content).expect("write");
                }
                Some(files) => {
                    std::fs::create_dir_all(&target).expect("mkdir");
                    for (k, v) in files {
                        std::fs::write(target.join(k), v).expect("write");
                    }
                }
                None => std::fs::create_dir_all(&target).expect("mkdir"),
            }
            // Content volumes are read-only whatever the mount says.
            let writable = !read_only
                && pod_volume(w.pod, name)
                    .map(|v| {
                        v.get("emptyDir").is_some() || v.get("persistentVolumeClaim").is_some()
                    })
                    .unwrap_or(true);
            mounts.push((path.to_string(), writable));
        }
        mounts.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
        for (p, _) in &mounts {
            assert!(
                !root.starts_with(p),
                "the scratch directory {} lies under mountPath {p}",
                root.display()
            );
        }
        let env = list(c, "/env")
            .iter()
            .map(|e| text(e, "/name").to_string())
            .collect();
        PodFs { root, mounts, env }
    }

    fn local(&self, path: &str) -> PathBuf {
        self.root.join(path.trim_start_matches('/'))
    }

    /// The config text with every absolute path under a mount moved into the scratch root.
    fn localize(&self, config: &str) -> String {
        let mut out = config.to_string();
        for (p, _) in &self.mounts {
            let root = self.root.display();
            out = out
                .replace(&format!("\"{p}/"), &format!("\"{root}{p}/"))
                .replace(&format!("\"{p}\""), &format!("\"{root}{p}\""));
        }
        out
    }

    fn mount_of(&self, local: &Path) -> Option<&(String, bool)> {
        self.mounts
            .iter()
            .find(|(p, _)| local.starts_with(self.local(p)))
    }
}

/// Walks a (localized) chgate config: every `*_file` is a file the pod has, `cache_file`
/// and `state_dir` are on writable volumes, every `*_env` is in the container's environment.
fn check_config_paths(table: &toml::Table, fs: &PodFs, at: &str, problems: &mut Vec<String>) {
    check_paths_except(table, fs, at, &[], problems)
}

/// [`check_config_paths`], leaving out `skip` keys (a push never writes the proxies' cache).
fn check_paths_except(
    table: &toml::Table,
    fs: &PodFs,
    at: &str,
    skip: &[&str],
    problems: &mut Vec<String>,
) {
    for (k, v) in table {
        let key = if at.is_empty() {
            k.clone()
        } else {
            format!("{at}.{k}")
        };
        match v {
            _ if skip.contains(&k.as_str()) => {}
            toml::Value::Table(t) => check_paths_except(t, fs, &key, skip, problems),
            toml::Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    if let toml::Value::Table(t) = item {
                        check_paths_except(t, fs, &format!("{key}[{i}]"), skip, problems);
                    }
                }
            }
            toml::Value::String(s) => {
                let path = Path::new(s);
                let on_volume = path.starts_with(&fs.root);
                if k == "cache_file" || k == "state_dir" {
                    let dir = if k == "cache_file" {
                        path.parent().unwrap_or(path)
                    } else {
                        path
                    };
                    match fs.mount_of(dir) {
                        Some((_, true)) if on_volume => {}
                        _ => problems.push(format!("{key} = {s}: not on a writable volume")),
                    }
                } else if k.ends_with("_file") {
                    if !on_volume || !path.is_file() {
                        problems.push(format!(
                            "{key} = {s}: no such file among the container's mounts"
                        ));
                    }
                } else if k.ends_with("_env") && !k.ends_with("_from_env") && !fs.env.contains(s) {
                    problems.push(format!("{key} = {s}: not in the container's env"));
                }
            }
            _ => {}
        }
    }
}

fn write_toml(fs: &PodFs, name: &str, table: &toml::Table) -> PathBuf {
    let path = fs.root.join(name);
    std::fs::write(&path, toml::to_string(table).expect("serialize")).expect("write");
    path
}

/// `chgate config check FILE`, the CLI.
fn config_check(path: &Path) -> Result<(), String> {
    let out = Command::new(CHGATE)
        .args(["config", "check"])
        .arg(path)
        .output()
        .expect("run chgate");
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "chgate config check {}:\n{}{}",
            path.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn problems_text(problems: &[chgate::config::Problem]) -> String {
    problems
        .iter()
        .map(|p| format!("  {p}"))
        .collect::<Vec<_>>()
        .join("\n")
}

// ---------------------------------------------------------------------------------------
// 1. Render and validate
// ---------------------------------------------------------------------------------------

#[test]
fn every_kustomization_renders_and_validates_against_the_schemas() {
    let dirs: Vec<&str> = renders().keys().map(String::as_str).collect();
    for expected in [
        ".",
        "sidecar",
        "proxy",
        "ingest",
        "ingest-sidecar",
        "cdc",
        "clickhouse",
    ] {
        assert!(
            dirs.contains(&expected),
            "no kustomization {expected}: {dirs:?}"
        );
    }
    let validate = venv_tool("kubernetes-validate");
    let mut problems = Vec::new();
    let mut custom = Vec::new();
    for r in renders().values() {
        let dir = scratch("render");
        let file = dir.join("render.yaml");
        std::fs::write(&file, &r.yaml).expect("write render");
        for version in [Some(OLDEST_KUBERNETES), None] {
            let mut cmd = Command::new(&validate);
            cmd.args(["--strict", "--quiet"]);
            if let Some(v) = version {
                cmd.args(["-k", v]);
            }
            let (ok, out, err) = run(cmd.arg(&file), None);
            let against = version.unwrap_or("the newest it knows");
            for line in out.lines().chain(err.lines()) {
                if let Some(rest) = line.strip_prefix("WARN ") {
                    // "Couldn't find schema for kind K with api version V ...": CRDs only.
                    let known = CUSTOM_KINDS.iter().any(|(api, kind)| {
                        rest.contains(&format!("for kind {kind} with api version {api} "))
                    });
                    if !known {
                        problems.push(format!("{}: {line}", r.dir));
                    }
                } else if !line.trim().is_empty() {
                    problems.push(format!("{} (Kubernetes {against}): {line}", r.dir));
                }
            }
            if !ok {
                problems.push(format!(
                    "{}: kubernetes-validate failed against {against}",
                    r.dir
                ));
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
        for o in &r.objects {
            let pair = (text(o, "/apiVersion"), text(o, "/kind"));
            if CUSTOM_KINDS.contains(&pair) {
                custom.push((r.dir.clone(), o));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    assert!(
        custom
            .iter()
            .any(|(_, o)| text(o, "/kind") == "ScaledObject")
            && custom.iter().any(|(_, o)| text(o, "/kind") == "PodMonitor"),
        "the KEDA and Prometheus Operator extras are rendered"
    );
    for (dir, o) in custom {
        check_custom_resource(&dir, o);
    }
}

/// What kubernetes-validate cannot check: the custom resources' required fields and what
/// they point at.
fn check_custom_resource(dir: &str, o: &Value) {
    let id = format!("{dir}: {}", kind_name(o));
    assert!(!text(o, "/metadata/name").is_empty(), "{id}: metadata.name");
    let standalone = &rendered(LAYOUTS[0]).objects;
    match text(o, "/kind") {
        "ScaledObject" => {
            let target = o.pointer("/spec/scaleTargetRef").expect("scaleTargetRef");
            let kind = match text(target, "/kind") {
                "" => "Deployment",
                k => k,
            };
            assert!(
                find(standalone, kind, text(target, "/name")).is_some(),
                "{id}: scaleTargetRef {kind}/{} is not in the standalone layout",
                text(target, "/name")
            );
            let min = o
                .pointer("/spec/minReplicaCount")
                .and_then(Value::as_u64)
                .unwrap_or(0);
            let max = o
                .pointer("/spec/maxReplicaCount")
                .and_then(Value::as_u64)
                .unwrap_or(100);
            assert!(min <= max && max > 0, "{id}: replica counts {min}..{max}");
            let triggers = list(o, "/spec/triggers");
            assert!(!triggers.is_empty(), "{id}: no triggers");
            for t in triggers {
                assert!(!text(t, "/type").is_empty(), "{id}: a trigger without type");
                let meta = t
                    .get("metadata")
                    .and_then(Value::as_object)
                    .expect("trigger metadata");
                assert!(
                    meta.values().all(Value::is_string),
                    "{id}: trigger metadata values are strings"
                );
                if text(t, "/type") == "prometheus" {
                    for k in ["serverAddress", "query", "threshold"] {
                        assert!(!text(t, &format!("/metadata/{k}")).is_empty(), "{id}: {k}");
                    }
                    text(t, "/metadata/threshold")
                        .parse::<f64>()
                        .unwrap_or_else(|_| panic!("{id}: threshold is not a number"));
                }
            }
        }
        "PodMonitor" => {
            let selector = string_map(o.pointer("/spec/selector/matchLabels"));
            let endpoints = list(o, "/spec/podMetricsEndpoints");
            assert!(!endpoints.is_empty(), "{id}: no podMetricsEndpoints");
            // Some layout has pods it selects, and each endpoint's port is a named port of a
            // selected pod in some layout.
            let pods: Vec<&Value> = LAYOUTS
                .iter()
                .flat_map(|l| workloads(&rendered(l).objects))
                .filter(|w| selects(&selector, &w.labels))
                .map(|w| w.pod)
                .collect();
            assert!(!pods.is_empty(), "{id}: selects no pod of any layout");
            for e in endpoints {
                let port = text(e, "/port");
                assert!(
                    pods.iter().any(|p| containers(p)
                        .flat_map(|c| list(c, "/ports"))
                        .any(|cp| text(cp, "/name") == port)),
                    "{id}: no selected pod has a port named {port:?}"
                );
                assert!(text(e, "/path").starts_with('/'), "{id}: path");
                if let Some(cred) = e.pointer("/authorization/credentials") {
                    let (name, key) = (text(cred, "/name"), text(cred, "/key"));
                    let secret = find(&rendered(SECRETS).objects, "Secret", name)
                        .unwrap_or_else(|| panic!("{id}: Secret {name} is not in {SECRETS}"));
                    assert!(
                        object_data(secret).contains_key(key),
                        "{id}: {name} has no {key}"
                    );
                }
            }
        }
        other => panic!("{id}: {other} is not checked"),
    }
}

// ---------------------------------------------------------------------------------------
// 2. chgate's own checks of every config, with the pod's files
// ---------------------------------------------------------------------------------------

#[test]
fn every_chgate_config_passes_chgate_own_checks_with_the_pods_files() {
    let mut problems = Vec::new();
    for layout in LAYOUTS {
        let objects = &rendered(layout).objects;
        let (bootstrap, cluster) = pushed(objects);
        // The pushed file holds only what ZooKeeper holds.
        if let Err(p) = chgate::config::zookeeper::split(&cluster) {
            problems.push(format!("{layout}: the pushed file:\n{}", problems_text(&p)));
        }
        let proxy_source = toml_table(&bootstrap, "bootstrap")
            .get("config_source")
            .cloned()
            .expect("the proxies' bootstrap has [config_source]");
        let roles: BTreeSet<String> = chgates(objects)
            .iter()
            .map(|c| format!("{:?}", c.role))
            .collect();
        assert_eq!(
            roles.into_iter().collect::<Vec<_>>(),
            ["Cdc", "Ingest", "Proxy", "Push"],
            "{layout}: every role is in the layout"
        );
        for c in chgates(objects) {
            let id = format!("{layout}: {}", c.id());
            let fs = PodFs::build(objects, &c.workload, c.container);
            let mut local = Vec::new();
            // Every flag the container passes is one chgate takes.
            let mut args: Vec<String> = list(c.container, "/args")
                .iter()
                .map(|a| a.as_str().unwrap_or_default().to_string())
                .collect();
            args.push("--help".into());
            let (ok, _, err) = run(Command::new(CHGATE).args(&args), None);
            if !ok {
                local.push(format!("chgate {args:?}: {err}"));
            }
            let config_file = fs.local(&c.config_path);
            let config = fs.localize(&c.config);
            std::fs::write(&config_file, &config).expect("write config");
            let skip: &[&str] = if c.role == Role::Push {
                &["cache_file"]
            } else {
                &[]
            };
            check_paths_except(&toml_table(&config, &id), &fs, "", skip, &mut local);
            let cluster_here = fs.localize(&cluster);
            match c.role {
                Role::Proxy | Role::Push => {
                    if c.config != bootstrap {
                        local.push("runs another bootstrap file than the push Job".into());
                    }
                    if let Err(e) = config_check(&config_file) {
                        local.push(e);
                    }
                    // What the proxy validates once it has read ZooKeeper (and what the
                    // push validates before publishing): the two files together, with the
                    // account secrets of this pod.
                    check_config_paths(&toml_table(&cluster_here, "pushed"), &fs, "", &mut local);
                    let merged =
                        write_toml(&fs, "merged.toml", &merged_proxy(&config, &cluster_here));
                    if let Err(e) = config_check(&merged) {
                        local.push(format!("with the pushed file: {e}"));
                    }
                }
                Role::Ingest => {
                    // The file alone, as `chgate config check` takes it.
                    if let Err(e) = config_check(&config_file) {
                        local.push(e);
                    }
                    // With [config_source] the clusters are the root's: validated as the
                    // sidecar does at start, with the pushed file's (whole, offline).
                    if let Some(source) = toml_table(&c.config, &id).get("config_source") {
                        for k in ["zookeeper", "root"] {
                            if source.get(k) != proxy_source.get(k) {
                                local.push(format!(
                                    "config_source.{k} is not the proxies' (one push serves both)"
                                ));
                            }
                        }
                        check_config_paths(
                            &toml_table(&cluster_here, "pushed"),
                            &fs,
                            "",
                            &mut local,
                        );
                        let merged =
                            write_toml(&fs, "merged.toml", &merged_ingest(&config, &cluster_here));
                        if let Err(p) = chgate::ingest::config::load(&merged) {
                            local.push(format!(
                                "ingest with the pushed clusters:\n{}",
                                problems_text(&p)
                            ));
                        }
                    } else if let Err(p) = chgate::ingest::config::load(&config_file) {
                        local.push(format!("ingest load:\n{}", problems_text(&p)));
                    }
                }
                Role::Cdc => {
                    if let Err(e) = config_check(&config_file) {
                        local.push(e);
                    }
                    if let Err(p) = chgate::cdc::config::load(&config_file) {
                        local.push(format!("cdc load:\n{}", problems_text(&p)));
                    }
                    let raw: chgate::cdc::config::CdcConfig =
                        toml::from_str(&c.config).expect("cdc config parses");
                    check_cdc(objects, &c, &raw, &mut local);
                }
            }
            problems.extend(local.into_iter().map(|p| format!("{id}: {p}")));
            let _ = std::fs::remove_dir_all(&fs.root);
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Active/standby: two replicas, a coordination ensemble, and a state_dir both reach.
fn check_cdc(
    objects: &[Value],
    c: &Chgate,
    config: &chgate::cdc::config::CdcConfig,
    problems: &mut Vec<String>,
) {
    if config.coordination.is_none() {
        problems.push("no [coordination]: two instances would both capture".into());
    }
    if c.workload.replicas != Some(2) {
        problems.push(format!(
            "replicas {:?}, not 2 (active/standby)",
            c.workload.replicas
        ));
    }
    let state = config.capture.state_dir.to_string_lossy().into_owned();
    let mount = list(c.container, "/volumeMounts")
        .iter()
        .find(|m| state.starts_with(text(m, "/mountPath")) && !text(m, "/mountPath").is_empty());
    let claim = mount
        .and_then(|m| pod_volume(c.workload.pod, text(m, "/name")))
        .map(|v| text(v, "/persistentVolumeClaim/claimName"))
        .unwrap_or_default();
    match find(objects, "PersistentVolumeClaim", claim) {
        Some(pvc)
            if list(pvc, "/spec/accessModes")
                .iter()
                .any(|m| m == "ReadWriteMany") => {}
        _ => problems.push(format!(
            "state_dir {state} is not on a ReadWriteMany claim both instances mount"
        )),
    }
}

// ---------------------------------------------------------------------------------------
// 3. Ports, probes, Services and host names
// ---------------------------------------------------------------------------------------

/// The admin server's paths, read from `route` in src/admin/mod.rs.
fn admin_routes() -> BTreeSet<String> {
    let src = std::fs::read_to_string(repo().join("src/admin/mod.rs")).expect("src/admin/mod.rs");
    let start = src.find("fn route(").expect("fn route in src/admin/mod.rs");
    let body = &src[start..];
    let body = &body[..body[1..].find("\nfn ").map_or(body.len(), |i| i + 1)];
    let mut routes = BTreeSet::new();
    for (i, _) in body.match_indices("\"/") {
        let rest = &body[i + 1..];
        let end = rest.find('"').expect("closing quote");
        let path = &rest[..end];
        if path
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "/_-".contains(c))
        {
            routes.insert(path.to_string());
        }
    }
    routes
}

/// What a chgate container listens on, by config key, as chgate reads it (defaults
/// included).
fn listeners(c: &Chgate, cluster: &str) -> Vec<(&'static str, SocketAddr)> {
    let mut out = Vec::new();
    match c.role {
        Role::Proxy => {
            let cfg = typed_proxy(&c.config, cluster);
            let p = &cfg.proxy;
            out.extend(p.http_listen.map(|a| ("proxy.http_listen", a)));
            out.extend(p.tls.as_ref().map(|t| ("proxy.tls.listen", t.listen)));
            out.extend(p.native_listen.map(|a| ("proxy.native_listen", a)));
            out.extend(
                p.native_tls
                    .as_ref()
                    .map(|t| ("proxy.native_tls.listen", t.listen)),
            );
            out.extend(cfg.admin.listen.map(|a| ("admin.listen", a)));
        }
        Role::Ingest => {
            let cfg: chgate::ingest::config::IngestConfig =
                toml::from_str(&c.config).expect("ingest config parses");
            out.extend(cfg.admin.listen.map(|a| ("admin.listen", a)));
        }
        Role::Cdc => {
            let cfg: chgate::cdc::config::CdcConfig =
                toml::from_str(&c.config).expect("cdc config parses");
            out.extend(cfg.admin.listen.map(|a| ("admin.listen", a)));
        }
        Role::Push => {}
    }
    out
}

fn container_port(c: &Value, port: &Value) -> Option<u64> {
    // A port by name or number, among those the container declares.
    list(c, "/ports")
        .iter()
        .find(|p| match port {
            Value::Number(n) => p["containerPort"].as_u64() == n.as_u64(),
            Value::String(name) => text(p, "/name") == name,
            _ => false,
        })
        .and_then(|p| p["containerPort"].as_u64())
}

fn probes(c: &Value) -> impl Iterator<Item = (&'static str, &Value)> {
    ["startupProbe", "readinessProbe", "livenessProbe"]
        .into_iter()
        .filter_map(|k| c.get(k).map(|p| (k, p)))
}

/// Names a pod of the render answers to, with the ports behind them: `<pod>.<service>` for
/// a StatefulSet's pods behind its headless Service, `<service>` for a ClusterIP Service.
fn dns_names(objects: &[Value]) -> BTreeMap<String, BTreeSet<u64>> {
    let mut names: BTreeMap<String, BTreeSet<u64>> = BTreeMap::new();
    let ws = workloads(objects);
    for svc in objects.iter().filter(|o| text(o, "/kind") == "Service") {
        let name = text(svc, "/metadata/name");
        let selector = string_map(svc.pointer("/spec/selector"));
        if text(svc, "/spec/clusterIP") == "None" {
            for w in ws
                .iter()
                .filter(|w| w.kind == "StatefulSet" && w.service_name == name)
            {
                assert!(
                    selects(&selector, &w.labels),
                    "Service {name} does not select {}",
                    w.id()
                );
                let ports: BTreeSet<u64> = containers(w.pod)
                    .flat_map(|c| list(c, "/ports"))
                    .filter_map(|p| p["containerPort"].as_u64())
                    .collect();
                for i in 0..w.replicas.unwrap_or(1) {
                    names.insert(format!("{}-{i}.{name}", w.name), ports.clone());
                }
            }
        } else {
            names.insert(
                name.to_string(),
                list(svc, "/spec/ports")
                    .iter()
                    .filter_map(|p| p["port"].as_u64())
                    .collect(),
            );
        }
    }
    names
}

fn split_host_port(address: &str) -> (&str, u64) {
    let rest = address.trim_start_matches("http://").trim_end_matches('/');
    let (host, port) = rest
        .rsplit_once(':')
        .unwrap_or_else(|| panic!("{address}: no port"));
    (
        host,
        port.parse().unwrap_or_else(|_| panic!("{address}: port")),
    )
}

#[test]
fn ports_probes_services_and_hosts_match_the_configs() {
    let routes = admin_routes();
    for p in TOKEN_FREE {
        assert!(
            routes.contains(p),
            "the admin server serves {p} ({routes:?})"
        );
    }
    let mut problems = Vec::new();
    for layout in LAYOUTS {
        let objects = &rendered(layout).objects;
        let (bootstrap, cluster) = pushed(objects);
        let names = dns_names(objects);
        let resolve = |address: &str, pod: &Value, what: &str, problems: &mut Vec<String>| {
            let (host, port) = split_host_port(address);
            let known = if host == "127.0.0.1" || host == "localhost" {
                containers(pod)
                    .flat_map(|c| list(c, "/ports"))
                    .any(|p| p["containerPort"].as_u64() == Some(port))
            } else {
                names.get(host).is_some_and(|ports| ports.contains(&port))
            };
            if !known {
                problems.push(format!(
                    "{what} {address}: nothing in the render answers there"
                ));
            }
        };

        // Every chgate container: ports are its listeners, probes its token-free admin
        // paths on the admin listener, every address in its config resolves.
        for c in chgates(objects) {
            let id = format!("{layout}: {}", c.id());
            let listening = listeners(&c, &cluster);
            let ports = list(c.container, "/ports");
            for (key, addr) in &listening {
                if !addr.ip().is_unspecified() {
                    problems.push(format!(
                        "{id}: {key} {addr} is not reachable from outside the container"
                    ));
                }
                if !ports
                    .iter()
                    .any(|p| p["containerPort"].as_u64() == Some(u64::from(addr.port())))
                {
                    problems.push(format!("{id}: {key} {addr} has no containerPort"));
                }
            }
            for p in ports {
                let n = p["containerPort"].as_u64();
                if !listening
                    .iter()
                    .any(|(_, a)| Some(u64::from(a.port())) == n)
                {
                    problems.push(format!(
                        "{id}: containerPort {n:?} is no listener of its config"
                    ));
                }
            }
            let admin = listening
                .iter()
                .find(|(k, _)| *k == "admin.listen")
                .map(|(_, a)| a.port());
            for (kind, probe) in probes(c.container) {
                let Some(get) = probe.get("httpGet") else {
                    problems.push(format!(
                        "{id}: {kind} is not an httpGet of the admin listener"
                    ));
                    continue;
                };
                if container_port(c.container, &get["port"]) != admin.map(u64::from) {
                    problems.push(format!(
                        "{id}: {kind} port {} is not admin.listen",
                        get["port"]
                    ));
                }
                let path = text(get, "/path");
                if !TOKEN_FREE.contains(&path) || !routes.contains(path) {
                    problems.push(format!(
                        "{id}: {kind} path {path} is not a token-free admin route"
                    ));
                }
            }
            if c.role != Role::Push && c.container.get("livenessProbe").is_none() {
                problems.push(format!("{id}: no livenessProbe"));
            }
            // Addresses in the config.
            let table = toml_table(&c.config, &id);
            for section in ["config_source", "coordination"] {
                for zk in table
                    .get(section)
                    .and_then(|s| s.get("zookeeper"))
                    .and_then(toml::Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    resolve(
                        zk.as_str().unwrap_or(""),
                        c.workload.pod,
                        &format!("{id}: {section}.zookeeper"),
                        &mut problems,
                    );
                }
            }
            if let Some(url) = table
                .get("pick_api")
                .and_then(|p| p.get("url"))
                .and_then(toml::Value::as_str)
            {
                resolve(
                    url,
                    c.workload.pod,
                    &format!("{id}: pick_api.url"),
                    &mut problems,
                );
            }
        }
        // The proxy's readiness is /readyz (it leaves the Services when it cannot serve).
        for c in chgates(objects).iter().filter(|c| c.role == Role::Proxy) {
            if text(c.container, "/readinessProbe/httpGet/path") != "/readyz" {
                problems.push(format!("{layout}: {}: readiness is not /readyz", c.id()));
            }
        }

        // The cluster's nodes and ensembles are the render's.
        let cfg = typed_proxy(&bootstrap, &cluster);
        for (name, cl) in &cfg.clusters {
            for g in cl.groups() {
                for zk in &g.zookeeper {
                    resolve(
                        zk,
                        &Value::Null,
                        &format!("{layout}: clusters.{name} shard group zookeeper"),
                        &mut problems,
                    );
                }
                for r in g.shards.iter().flat_map(|s| &s.replicas) {
                    for port in [r.http_port, r.native_port] {
                        resolve(
                            &format!("{}:{port}", r.host),
                            &Value::Null,
                            &format!("{layout}: clusters.{name} replica"),
                            &mut problems,
                        );
                    }
                }
            }
        }

        // Every probe's port is a port of its container.
        for w in workloads(objects) {
            for c in containers(w.pod) {
                for (kind, probe) in probes(c) {
                    let port = probe
                        .pointer("/httpGet/port")
                        .or_else(|| probe.pointer("/tcpSocket/port"));
                    if let Some(port) = port {
                        if container_port(c, port).is_none() {
                            problems.push(format!(
                                "{layout}: {} {kind}: port {port} is not a container port",
                                w.id()
                            ));
                        }
                    }
                }
            }
        }

        // Every Service selects pods, and every targetPort is a port of each of them.
        let ws = workloads(objects);
        for svc in objects.iter().filter(|o| text(o, "/kind") == "Service") {
            let id = format!("{layout}: {}", kind_name(svc));
            let selector = string_map(svc.pointer("/spec/selector"));
            let selected: Vec<&Workload> = ws
                .iter()
                .filter(|w| w.kind != "Job" && selects(&selector, &w.labels))
                .collect();
            if selected.is_empty() {
                problems.push(format!("{id}: selects no pod"));
            }
            for p in list(svc, "/spec/ports") {
                let target = p.get("targetPort").unwrap_or(&p["port"]);
                for w in &selected {
                    if !containers(w.pod).any(|c| container_port(c, target).is_some()) {
                        problems.push(format!(
                            "{id}: targetPort {target} is no port of {}",
                            w.id()
                        ));
                    }
                }
            }
        }

        check_clickhouse_and_zookeeper(objects, &bootstrap, &cfg, &mut problems);
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// The example ClickHouse nodes include what chgate publishes, each from its own shard
/// group's ensemble, with every variable their config names set; the ensembles are the
/// members the cluster config lists and answer the picker's probes.
fn check_clickhouse_and_zookeeper(
    objects: &[Value],
    bootstrap: &str,
    cfg: &chgate::config::Config,
    problems: &mut Vec<String>,
) {
    let root = toml_table(bootstrap, "bootstrap")["config_source"]["root"]
        .as_str()
        .expect("config_source.root")
        .to_string();
    let published_from = format!("{root}/clickhouse/remote_servers");
    let mut env_needed: BTreeSet<String> = BTreeSet::new();
    let mut groups = Vec::new(); // (shard number, replica hosts, ensemble)
    let mut shard_num = 0;
    for cl in cfg.clusters.values() {
        if let Some(rs) = &cl.remote_servers {
            env_needed.extend(rs.password_from_env.clone());
            env_needed.extend(rs.secret_from_env.clone());
        }
        for g in cl.groups() {
            for s in &g.shards {
                shard_num += 1;
                let hosts: BTreeSet<String> = s.replicas.iter().map(|r| r.host.clone()).collect();
                let zk: BTreeSet<String> = g.zookeeper.iter().cloned().collect();
                groups.push((shard_num, hosts, zk));
            }
        }
    }
    let picker_words = {
        let probe = std::fs::read_to_string(repo().join("src/picker/probe.rs")).expect("probe.rs");
        probe
            .match_indices("four_letter_word(addr, b\"")
            .map(|(i, m)| probe[i + m.len()..i + m.len() + 4].to_string())
            .collect::<BTreeSet<_>>()
    };
    assert!(
        picker_words.contains("ruok") && picker_words.contains("mntr"),
        "{picker_words:?}"
    );

    let mut clickhouse_seen = 0;
    for w in workloads(objects) {
        for c in containers(w.pod) {
            let image = text(c, "/image");
            let id = format!("{}: {}", w.id(), text(c, "/name"));
            if image.starts_with("clickhouse/clickhouse-server:") {
                clickhouse_seen += 1;
                let env: BTreeMap<&str, &Value> = list(c, "/env")
                    .iter()
                    .map(|e| (text(e, "/name"), e))
                    .collect();
                let mut xml = Vec::new();
                for dir in [
                    "/etc/clickhouse-server/config.d",
                    "/etc/clickhouse-server/users.d",
                ] {
                    let m = list(c, "/volumeMounts")
                        .iter()
                        .find(|m| text(m, "/mountPath") == dir)
                        .unwrap_or_else(|| panic!("{id}: nothing mounted at {dir}"));
                    let files = pod_volume(w.pod, text(m, "/name"))
                        .and_then(|v| volume_files(objects, v))
                        .unwrap_or_else(|| panic!("{id}: {dir} is not from ConfigMaps"));
                    xml.extend(files.into_iter().map(|(k, v)| (format!("{dir}/{k}"), v)));
                }
                let all: String = xml.iter().map(|(_, v)| v.as_str()).collect();
                if !all.contains(&format!("from_zk=\"{published_from}\"")) {
                    problems.push(format!(
                        "{id}: no <remote_servers from_zk=\"{published_from}\"/>"
                    ));
                }
                // Every from_env names a variable of the container; every variable the
                // published remote_servers names is set.
                let mut named: BTreeSet<String> = all
                    .match_indices("from_env=\"")
                    .map(|(i, m)| {
                        let rest = &all[i + m.len()..];
                        rest[..rest.find('"').expect("quote")].to_string()
                    })
                    .collect();
                named.extend(env_needed.iter().cloned());
                for v in named.iter().filter(|v| !env.contains_key(v.as_str())) {
                    problems.push(format!("{id}: {v} is not in its env"));
                }
                // Its pods are one shard of the cluster; its ensemble is that shard's group's.
                let pods: BTreeSet<String> = (0..w.replicas.unwrap_or(1))
                    .map(|i| format!("{}-{i}.{}", w.name, w.service_name))
                    .collect();
                let Some((num, _, zk)) = groups.iter().find(|(_, hosts, _)| *hosts == pods) else {
                    problems.push(format!(
                        "{id}: its pods {pods:?} are not a shard of the cluster"
                    ));
                    continue;
                };
                let shard_env = env.get("CH_SHARD").map(|e| text(e, "/value")).unwrap_or("");
                if shard_env != num.to_string() {
                    problems.push(format!(
                        "{id}: CH_SHARD {shard_env:?}, but its pods are shard {num}"
                    ));
                }
                let mut nodes = BTreeSet::new();
                for (_, v) in &xml {
                    for (i, _) in v.match_indices("<node><host>") {
                        let rest = &v[i + "<node><host>".len()..];
                        let host = &rest[..rest.find('<').expect("tag")];
                        let port_at = rest.find("<port>").expect("port") + "<port>".len();
                        let port =
                            &rest[port_at..port_at + rest[port_at..].find('<').expect("tag")];
                        nodes.insert(format!("{host}:{port}"));
                    }
                }
                if &nodes != zk {
                    problems.push(format!(
                        "{id}: its zookeeper {nodes:?} is not its shard group's {zk:?}"
                    ));
                }
            }
            if image.starts_with("zookeeper:") {
                let Some(cfg) = file_in_container(objects, w.pod, c, "/conf/zoo.cfg") else {
                    problems.push(format!("{id}: no /conf/zoo.cfg from a ConfigMap"));
                    continue;
                };
                let kv: BTreeMap<&str, &str> = cfg
                    .lines()
                    .filter(|l| !l.starts_with('#'))
                    .filter_map(|l| l.split_once('='))
                    .map(|(k, v)| (k.trim(), v.trim()))
                    .collect();
                let whitelist: BTreeSet<String> = kv
                    .get("4lw.commands.whitelist")
                    .unwrap_or(&"")
                    .split(',')
                    .map(|s| s.trim().to_string())
                    .collect();
                for word in &picker_words {
                    if !whitelist.contains(word) && !whitelist.contains("*") {
                        problems.push(format!(
                            "{id}: 4lw.commands.whitelist lacks {word} (chgate's picker sends it)"
                        ));
                    }
                }
                let client = kv.get("clientPort").and_then(|p| p.parse::<u64>().ok());
                if client != container_port(c, &Value::String("client".into())) {
                    problems.push(format!(
                        "{id}: clientPort {client:?} is not its port named client"
                    ));
                }
                let replicas = w.replicas.unwrap_or(1);
                let servers: Vec<(&str, &str)> = kv
                    .iter()
                    .filter(|(k, _)| k.starts_with("server."))
                    .map(|(k, v)| (*k, *v))
                    .collect();
                if servers.len() as u64 != replicas {
                    problems.push(format!(
                        "{id}: {} servers for {replicas} replicas",
                        servers.len()
                    ));
                }
                for (k, v) in servers {
                    let n: u64 = k["server.".len()..].parse().unwrap_or(0);
                    let expected = format!("{}-{}.{}:", w.name, n.wrapping_sub(1), w.service_name);
                    if n == 0 || n > replicas || !v.starts_with(&expected) {
                        problems.push(format!("{id}: {k}={v} is not pod {expected}"));
                    }
                }
            }
        }
    }
    if clickhouse_seen == 0 {
        problems.push("no ClickHouse StatefulSet in the layout".into());
    }
}

// ---------------------------------------------------------------------------------------
// 4. Images and the Dockerfile
// ---------------------------------------------------------------------------------------

#[test]
fn images_are_this_version_and_the_dockerfile_builds_it() {
    let expected = format!("chgate:{VERSION}");
    let mut problems = Vec::new();
    let mut chgate_containers = 0;
    for r in renders().values() {
        for w in workloads(&r.objects) {
            for c in containers(w.pod) {
                let image = text(c, "/image");
                let id = format!("{}: {} {}", r.dir, w.id(), text(c, "/name"));
                let (name, tag) = image.rsplit_once(':').unwrap_or((image, ""));
                if tag.is_empty() || tag == "latest" {
                    problems.push(format!("{id}: image {image} has no pinned tag"));
                }
                if name.rsplit('/').next() == Some("chgate") {
                    chgate_containers += 1;
                    if image != expected {
                        problems.push(format!("{id}: image {image}, not {expected}"));
                    }
                    // The image's ENTRYPOINT is the binary; containers only pass args.
                    if c.get("command").is_some() {
                        problems.push(format!("{id}: overrides the image's entrypoint"));
                    }
                }
            }
        }
    }
    assert!(chgate_containers > 0, "no chgate container rendered");

    let dockerfile = repo().join("deploy/docker/Dockerfile");
    let text = std::fs::read_to_string(&dockerfile)
        .unwrap_or_else(|e| panic!("{}: {e}", dockerfile.display()));
    for needed in [
        "cargo build --release --locked --bin chgate",
        "COPY --from=build /out/chgate /usr/local/bin/chgate",
        "ENTRYPOINT [\"/usr/local/bin/chgate\"]",
        &format!("USER {CHGATE_UID}:{CHGATE_UID}"),
        &format!("ARG CHGATE_VERSION={VERSION}"),
        &format!("-t chgate:{VERSION} ."),
        "COPY Cargo.toml Cargo.lock ./",
        "COPY src ./src",
    ] {
        if !text.contains(needed) {
            problems.push(format!("deploy/docker/Dockerfile lacks {needed:?}"));
        }
    }
    // Cargo needs every target the manifest declares to exist, built or not.
    let manifest = toml_table(
        &std::fs::read_to_string(repo().join("Cargo.toml")).expect("Cargo.toml"),
        "Cargo.toml",
    );
    if manifest.contains_key("bench") && !text.contains("COPY benches ./benches") {
        problems.push(
            "deploy/docker/Dockerfile does not copy benches/, which Cargo.toml declares".into(),
        );
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

// ---------------------------------------------------------------------------------------
// 5. Secrets stay in Secrets; every reference resolves
// ---------------------------------------------------------------------------------------

/// A config key that would hold a secret in the clear.
fn secret_key(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    ["password", "token", "secret"]
        .iter()
        .any(|s| k.contains(s))
        && !(k.ends_with("_env") || k.ends_with("_file") || k == "password_hash")
}

fn toml_secret_keys(table: &toml::Table, at: &str, out: &mut Vec<String>) {
    for (k, v) in table {
        let key = if at.is_empty() {
            k.clone()
        } else {
            format!("{at}.{k}")
        };
        match v {
            toml::Value::Table(t) => toml_secret_keys(t, &key, out),
            toml::Value::Array(items) => {
                for item in items {
                    if let toml::Value::Table(t) = item {
                        toml_secret_keys(t, &key, out);
                    }
                }
            }
            _ if secret_key(k) => out.push(key),
            _ => {}
        }
    }
}

/// `<password>x</password>` or `<secret>x</secret>` with a value (from_env is the way).
fn xml_secret_values(xml: &str) -> Vec<String> {
    let mut xml = xml.to_string();
    while let Some(start) = xml.find("<!--") {
        let end = xml[start..]
            .find("-->")
            .map_or(xml.len(), |e| start + e + 3);
        xml.replace_range(start..end, "");
    }
    let xml = xml.as_str();
    let mut out = Vec::new();
    for tag in [
        "password",
        "password_sha256_hex",
        "password_double_sha1_hex",
        "secret",
    ] {
        for (i, _) in xml.match_indices(&format!("<{tag}")) {
            let rest = &xml[i + tag.len() + 1..];
            let Some(end) = rest.find('>') else { continue };
            let head = &rest[..end];
            if !(head.starts_with(' ') || head.is_empty() || head == "/") || head.ends_with('/') {
                continue;
            }
            let body = &rest[end + 1..];
            let value = &body[..body.find('<').unwrap_or(body.len())];
            if !value.trim().is_empty() {
                out.push(format!("<{tag}> holds a value"));
            }
        }
    }
    out
}

#[test]
fn secrets_stay_in_secrets_and_every_reference_resolves() {
    let mut problems = Vec::new();
    let mut xml_docs = Vec::new();
    for r in renders().values() {
        for cm in r.objects.iter().filter(|o| text(o, "/kind") == "ConfigMap") {
            let id = format!("{}: {}", r.dir, kind_name(cm));
            for (key, value) in object_data(cm) {
                if value.contains("PRIVATE KEY") {
                    problems.push(format!("{id} {key}: a private key"));
                }
                if key.ends_with(".toml") {
                    let mut found = Vec::new();
                    toml_secret_keys(&toml_table(&value, &id), "", &mut found);
                    problems.extend(
                        found.into_iter().map(|k| {
                            format!("{id} {key}: {k} holds a secret (use *_file or *_env)")
                        }),
                    );
                }
                if key.ends_with(".xml") {
                    problems.extend(
                        xml_secret_values(&value)
                            .into_iter()
                            .map(|p| format!("{id} {key}: {p}")),
                    );
                    xml_docs.push((format!("{id} {key}"), value));
                }
            }
        }
    }
    // The ClickHouse configs are well-formed XML (Python's parser).
    let docs = serde_json::to_string(&xml_docs).expect("json");
    let script = "import sys, json, xml.etree.ElementTree as ET\n\
                  for name, text in json.load(sys.stdin):\n    \
                  try: ET.fromstring(text.encode())\n    \
                  except ET.ParseError as e: print(f'{name}: {e}')\n";
    let (ok, out, err) = run(
        Command::new(venv_tool("python")).args(["-c", script]),
        Some(&docs),
    );
    assert!(ok, "python: {err}");
    problems.extend(out.lines().map(str::to_string));

    let secrets = &rendered(SECRETS).objects;
    assert!(
        secrets.iter().all(|o| text(o, "/kind") == "Secret"),
        "{SECRETS} holds Secrets only"
    );
    for layout in LAYOUTS {
        let objects = &rendered(layout).objects;
        if objects.iter().any(|o| text(o, "/kind") == "Secret") {
            problems.push(format!(
                "{layout}: ships a Secret (they belong in {SECRETS}/, filled in by hand)"
            ));
        }
        let has = |kind: &str, name: &str, key: Option<&str>| -> bool {
            let pool = if kind == "Secret" { secrets } else { objects };
            find(pool, kind, name)
                .is_some_and(|o| key.is_none_or(|k| object_data(o).contains_key(k)))
        };
        for w in workloads(objects) {
            let id = format!("{layout}: {}", w.id());
            let mut used = BTreeSet::new();
            for c in containers(w.pod) {
                for m in list(c, "/volumeMounts") {
                    let name = text(m, "/name");
                    used.insert(name.to_string());
                    if pod_volume(w.pod, name).is_none() && !w.claims.contains(&name) {
                        problems.push(format!("{id}: volumeMount {name} has no volume"));
                    }
                }
                for e in list(c, "/env") {
                    for (kind, ptr) in [
                        ("Secret", "/valueFrom/secretKeyRef"),
                        ("ConfigMap", "/valueFrom/configMapKeyRef"),
                    ] {
                        if let Some(r) = e.pointer(ptr) {
                            let (name, key) = (text(r, "/name"), text(r, "/key"));
                            if !has(kind, name, Some(key)) {
                                problems.push(format!(
                                    "{id}: env {} wants {kind} {name} key {key}",
                                    text(e, "/name")
                                ));
                            }
                        }
                    }
                }
                for e in list(c, "/envFrom") {
                    for (kind, ptr) in [
                        ("Secret", "/secretRef/name"),
                        ("ConfigMap", "/configMapRef/name"),
                    ] {
                        let name = text(e, ptr);
                        if !name.is_empty() && !has(kind, name, None) {
                            problems.push(format!("{id}: envFrom wants {kind} {name}"));
                        }
                    }
                }
            }
            for v in list(w.pod, "/volumes") {
                let name = text(v, "/name");
                if !used.contains(name) {
                    problems.push(format!("{id}: volume {name} is mounted by no container"));
                }
                let mut refs = Vec::new();
                if let Some(s) = v.get("secret") {
                    refs.push(("Secret", text(s, "/secretName"), list(s, "/items")));
                }
                if let Some(cm) = v.get("configMap") {
                    refs.push(("ConfigMap", text(cm, "/name"), list(cm, "/items")));
                }
                for s in list(v, "/projected/sources") {
                    if let Some(cm) = s.get("configMap") {
                        refs.push(("ConfigMap", text(cm, "/name"), list(cm, "/items")));
                    }
                    if let Some(sec) = s.get("secret") {
                        refs.push(("Secret", text(sec, "/name"), list(sec, "/items")));
                    }
                }
                for (kind, obj, items) in refs {
                    if !has(kind, obj, None) {
                        problems.push(format!("{id}: volume {name} wants {kind} {obj}"));
                    }
                    for i in items {
                        if !has(kind, obj, Some(text(i, "/key"))) {
                            problems.push(format!(
                                "{id}: volume {name} wants {kind} {obj} key {}",
                                text(i, "/key")
                            ));
                        }
                    }
                }
                if let Some(claim) = v
                    .pointer("/persistentVolumeClaim/claimName")
                    .and_then(Value::as_str)
                {
                    if find(objects, "PersistentVolumeClaim", claim).is_none() {
                        problems.push(format!(
                            "{id}: volume {name} wants PersistentVolumeClaim {claim}"
                        ));
                    }
                }
            }
            // subPath mounts name a key of their volume.
            for c in containers(w.pod) {
                for m in list(c, "/volumeMounts")
                    .iter()
                    .filter(|m| !text(m, "/subPath").is_empty())
                {
                    let files =
                        pod_volume(w.pod, text(m, "/name")).and_then(|v| volume_files(objects, v));
                    if files.is_some_and(|f| !f.contains_key(text(m, "/subPath"))) {
                        problems.push(format!(
                            "{id}: subPath {} is not in volume {}",
                            text(m, "/subPath"),
                            text(m, "/name")
                        ));
                    }
                }
            }
        }
        // The TLS listeners' Secret is a TLS Secret.
        if let Some(tls) = find(secrets, "Secret", "chgate-tls") {
            if text(tls, "/type") != "kubernetes.io/tls" {
                problems.push("Secret chgate-tls is not of type kubernetes.io/tls".into());
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

// ---------------------------------------------------------------------------------------
// 6. Metric names
// ---------------------------------------------------------------------------------------

fn metric_tokens(s: &str, out: &mut BTreeSet<String>) {
    for (i, _) in s.match_indices("chgate_") {
        if i > 0 && s.as_bytes()[i - 1].is_ascii_alphanumeric() {
            continue;
        }
        let end = s[i..]
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .map_or(s.len(), |e| i + e);
        let token = &s[i..end];
        // A regex prefix such as chgate_.* names no metric.
        if !token.ends_with('_') {
            out.insert(token.to_string());
        }
    }
}

#[test]
fn every_metric_name_mentioned_is_exported() {
    let source = std::fs::read_to_string(repo().join("src/metrics.rs")).expect("src/metrics.rs");
    let mut mentioned = BTreeSet::new();
    for r in renders().values() {
        for o in &r.objects {
            let custom = CUSTOM_KINDS.contains(&(text(o, "/apiVersion"), text(o, "/kind")));
            if custom {
                metric_tokens(&o["spec"].to_string(), &mut mentioned);
            }
            for ptr in [
                "/metadata/annotations",
                "/spec/template/metadata/annotations",
            ] {
                if let Some(a) = o.pointer(ptr) {
                    metric_tokens(&a.to_string(), &mut mentioned);
                }
            }
        }
    }
    assert!(
        mentioned.contains("chgate_ingest_consumer_lag_messages"),
        "the KEDA query's metric is found ({mentioned:?})"
    );
    let missing: Vec<&String> = mentioned
        .iter()
        .filter(|m| {
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| m.strip_suffix(s))
                .unwrap_or(m);
            !source.contains(&format!("\"{m}\"")) && !source.contains(&format!("\"{base}\""))
        })
        .collect();
    assert!(
        missing.is_empty(),
        "not exported by src/metrics.rs: {missing:?}"
    );
}

// ---------------------------------------------------------------------------------------
// 7. Security contexts and resources
// ---------------------------------------------------------------------------------------

#[test]
fn every_container_runs_restricted_with_requests() {
    let mut problems = Vec::new();
    for r in renders().values() {
        for w in workloads(&r.objects) {
            let pod_sc = w.pod.get("securityContext").cloned().unwrap_or(Value::Null);
            let id = format!("{}: {}", r.dir, w.id());
            if w.pod.get("automountServiceAccountToken") != Some(&Value::Bool(false)) {
                problems.push(format!(
                    "{id}: mounts a service account token it does not need"
                ));
            }
            for c in containers(w.pod) {
                let cid = format!("{id} {}", text(c, "/name"));
                let sc = c.get("securityContext").cloned().unwrap_or(Value::Null);
                let either = |ptr: &str| sc.pointer(ptr).or_else(|| pod_sc.pointer(ptr)).cloned();
                if either("/runAsNonRoot") != Some(Value::Bool(true)) {
                    problems.push(format!("{cid}: runAsNonRoot is not true"));
                }
                if either("/runAsUser").is_some_and(|u| u.as_u64() == Some(0)) {
                    problems.push(format!("{cid}: runs as uid 0"));
                }
                if is_chgate(c) && either("/runAsUser").and_then(|u| u.as_u64()) != Some(CHGATE_UID)
                {
                    problems.push(format!("{cid}: not the image's user {CHGATE_UID}"));
                }
                if either("/seccompProfile/type")
                    .as_ref()
                    .and_then(Value::as_str)
                    != Some("RuntimeDefault")
                {
                    problems.push(format!("{cid}: seccompProfile is not RuntimeDefault"));
                }
                if sc.pointer("/readOnlyRootFilesystem") != Some(&Value::Bool(true)) {
                    problems.push(format!("{cid}: root filesystem is writable"));
                }
                if sc.pointer("/allowPrivilegeEscalation") != Some(&Value::Bool(false)) {
                    problems.push(format!("{cid}: allowPrivilegeEscalation is not false"));
                }
                if !list(&sc, "/capabilities/drop").iter().any(|d| d == "ALL") {
                    problems.push(format!("{cid}: capabilities are not all dropped"));
                }
                if !list(&sc, "/capabilities/add").is_empty()
                    || sc.get("privileged") == Some(&Value::Bool(true))
                {
                    problems.push(format!("{cid}: adds privileges"));
                }
                for k in ["cpu", "memory"] {
                    if text(c, &format!("/resources/requests/{k}")).is_empty() {
                        problems.push(format!("{cid}: no {k} request"));
                    }
                }
                if text(c, "/resources/limits/memory").is_empty() {
                    problems.push(format!("{cid}: no memory limit"));
                }
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
