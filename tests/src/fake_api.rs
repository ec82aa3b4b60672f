//! A fake Kubernetes API server speaking the real list/watch protocol over
//! HTTP/1.1, for driving the agent's kube-rs watchers in tests.
//!
//! - `GET <collection>` lists objects (JSON `…List` with
//!   `metadata.resourceVersion`); `fieldSelector=metadata.name=…` filters.
//! - `GET <collection>?watch=true&resourceVersion=N` streams watch events as
//!   chunked JSON lines: every change after N, then live ones; `BOOKMARK`
//!   events at intervals when `allowWatchBookmarks=true`; the stream ends at
//!   `timeoutSeconds`.
//! - History can be compacted: a watch from an older resourceVersion gets an
//!   `ERROR` event with a `410 Gone` Status, as a real API server sends, and
//!   the client must re-list.
//! - Watch connections can be dropped, and the server can be made unavailable
//!   (503 to every request) to simulate an outage.

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::broadcast,
};

use crate::netns::Netns;

/// A resource collection the fake serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Resource {
    Services,
    EndpointSlices,
    Nodes,
}

impl Resource {
    fn from_path(path: &str) -> Option<Self> {
        match path {
            "/api/v1/services" => Some(Self::Services),
            "/apis/discovery.k8s.io/v1/endpointslices" => Some(Self::EndpointSlices),
            "/api/v1/nodes" => Some(Self::Nodes),
            _ => None,
        }
    }

    fn of_kind(kind: &str) -> Option<Self> {
        match kind {
            "Service" => Some(Self::Services),
            "EndpointSlice" => Some(Self::EndpointSlices),
            "Node" => Some(Self::Nodes),
            _ => None,
        }
    }

    fn list_kind(self) -> (&'static str, &'static str) {
        match self {
            Self::Services => ("ServiceList", "v1"),
            Self::EndpointSlices => ("EndpointSliceList", "discovery.k8s.io/v1"),
            Self::Nodes => ("NodeList", "v1"),
        }
    }
}

#[derive(Clone, Debug)]
struct Change {
    rv: u64,
    resource: Resource,
    kind: &'static str,
    object: Value,
}

#[derive(Default)]
struct State {
    objects: BTreeMap<(Resource, String, String), Value>,
    history: Vec<Change>,
    /// Changes at or below this resourceVersion are forgotten (410 Gone).
    compacted: u64,
}

struct Shared {
    state: Mutex<State>,
    rv: AtomicU64,
    changes: broadcast::Sender<Change>,
    /// Bumped to end every open watch stream.
    drops: broadcast::Sender<()>,
    unavailable: AtomicBool,
    bookmark_every: Duration,
    requests: Mutex<Vec<String>>,
}

/// A running fake API server; stops when dropped.
pub struct FakeApi {
    shared: Arc<Shared>,
    runtime: Option<tokio::runtime::Runtime>,
    pub port: u16,
}

fn object_key(object: &Value) -> Result<(Resource, String, String)> {
    let kind = object["kind"].as_str().context("object without kind")?;
    let resource = Resource::of_kind(kind).with_context(|| format!("unsupported kind {kind}"))?;
    let name = object["metadata"]["name"]
        .as_str()
        .context("object without metadata.name")?
        .to_owned();
    let namespace = object["metadata"]["namespace"]
        .as_str()
        .unwrap_or(if resource == Resource::Nodes {
            ""
        } else {
            "default"
        })
        .to_owned();
    Ok((resource, namespace, name))
}

impl FakeApi {
    /// Starts a server listening on 127.0.0.1 inside `ns` (where the agent runs).
    pub fn start(ns: &Netns) -> Result<Self> {
        let listener = ns.run(|| {
            let l = std::net::TcpListener::bind("127.0.0.1:0")?;
            l.set_nonblocking(true)?;
            Ok(l)
        })?;
        let port = listener.local_addr()?.port();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let (changes, _) = broadcast::channel(65_536);
        let (drops, _) = broadcast::channel(16);
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            rv: AtomicU64::new(1000),
            changes,
            drops,
            unavailable: AtomicBool::new(false),
            bookmark_every: Duration::from_millis(500),
            requests: Mutex::new(Vec::new()),
        });
        let serving = Arc::clone(&shared);
        runtime.spawn(async move {
            let Ok(listener) = TcpListener::from_std(listener) else {
                return;
            };
            while let Ok((conn, _)) = listener.accept().await {
                // As Go's net/http (the real API server): no Nagle delay, or
                // a small watch event can wait for a delayed ACK (~40 ms).
                let _ = conn.set_nodelay(true);
                let shared = Arc::clone(&serving);
                tokio::spawn(async move {
                    let _ = serve_connection(conn, shared).await;
                });
            }
        });
        Ok(Self {
            shared,
            runtime: Some(runtime),
            port,
        })
    }

    /// A kubeconfig pointing at this server.
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster: {{server: \"http://127.0.0.1:{}\"}}\nusers:\n- name: fake\n  user: {{}}\ncontexts:\n- name: fake\n  context: {{cluster: fake, user: fake}}\ncurrent-context: fake\n",
            self.port
        )
    }

    fn record(&self, kind: &'static str, mut object: Value) -> Result<u64> {
        let key = object_key(&object)?;
        // The resourceVersion is taken and the change broadcast under the
        // lock: whoever holds it sees every change up to the current version
        // already queued (bookmarks rely on that).
        let mut state = self
            .shared
            .state
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?;
        let rv = self.shared.rv.fetch_add(1, Ordering::SeqCst) + 1;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        let exists = state.objects.contains_key(&key);
        let kind = match (kind, exists) {
            ("APPLY", true) => "MODIFIED",
            ("APPLY", false) => "ADDED",
            ("DELETED", false) => bail!("{key:?} does not exist"),
            (k, _) => k,
        };
        if kind == "DELETED" {
            let old = state.objects.remove(&key).unwrap_or(object.clone());
            object = old;
            object["metadata"]["resourceVersion"] = json!(rv.to_string());
        } else {
            state.objects.insert(key.clone(), object.clone());
        }
        let change = Change {
            rv,
            resource: key.0,
            kind,
            object,
        };
        state.history.push(change.clone());
        let _ = self.shared.changes.send(change);
        Ok(rv)
    }

    /// Creates or updates an object (a JSON value with kind and metadata).
    pub fn apply(&self, object: Value) -> Result<u64> {
        self.record("APPLY", object)
    }

    /// Creates or updates every object of a YAML manifest (multi-document).
    pub fn apply_yaml(&self, yaml: &str) -> Result<()> {
        for doc in yaml.split("\n---").filter(|d| !d.trim().is_empty()) {
            let value: Value = serde_yaml_to_json(doc)?;
            if !value.is_null() {
                self.apply(value)?;
            }
        }
        Ok(())
    }

    /// Deletes an object.
    pub fn delete(&self, kind: &str, namespace: &str, name: &str) -> Result<u64> {
        let object = json!({"kind": kind, "apiVersion": "v1", "metadata": {"name": name, "namespace": namespace}});
        self.record("DELETED", object)
    }

    /// Forgets all history: watches from any earlier resourceVersion get 410 Gone.
    pub fn compact(&self) {
        let now = self.shared.rv.load(Ordering::SeqCst);
        if let Ok(mut state) = self.shared.state.lock() {
            state.compacted = now;
            state.history.clear();
        }
    }

    /// Ends every open watch stream (clients reconnect).
    pub fn drop_watches(&self) {
        let _ = self.shared.drops.send(());
    }

    /// Makes every request fail with 503 (an outage) or serves again.
    pub fn set_unavailable(&self, down: bool) {
        self.shared.unavailable.store(down, Ordering::SeqCst);
        if down {
            self.drop_watches();
        }
    }

    /// Requests seen so far (request lines).
    pub fn requests(&self) -> Vec<String> {
        self.shared
            .requests
            .lock()
            .map(|r| r.clone())
            .unwrap_or_default()
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// YAML → JSON value (the fake stores JSON).
fn serde_yaml_to_json(doc: &str) -> Result<Value> {
    let yaml: serde_yaml::Value = serde_yaml::from_str(doc)?;
    Ok(serde_json::to_value(yaml)?)
}

fn query_param(query: &str, key: &str) -> Option<String> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| percent_decode(v))
    })
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn matches_selector(object: &Value, selector: Option<&str>) -> bool {
    let Some(selector) = selector else {
        return true;
    };
    selector.split(',').all(|term| match term.split_once('=') {
        Some(("metadata.name", name)) => object["metadata"]["name"].as_str() == Some(name),
        Some(("metadata.namespace", ns)) => object["metadata"]["namespace"].as_str() == Some(ns),
        _ => true,
    })
}

async fn write_response(conn: &mut TcpStream, status: &str, body: &str) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).await?;
    conn.write_all(body.as_bytes()).await
}

async fn write_chunk(conn: &mut TcpStream, line: &str) -> std::io::Result<()> {
    let payload = format!("{line}\n");
    conn.write_all(format!("{:x}\r\n{payload}\r\n", payload.len()).as_bytes())
        .await
}

/// Reads one request head; `None` at end of connection.
async fn read_head(conn: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<Option<String>> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            buf.drain(..end + 4);
            return Ok(Some(head));
        }
        let mut chunk = [0u8; 4096];
        let n = conn.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

async fn serve_connection(mut conn: TcpStream, shared: Arc<Shared>) -> std::io::Result<()> {
    let mut buf = Vec::new();
    while let Some(head) = read_head(&mut conn, &mut buf).await? {
        let line = head.lines().next().unwrap_or_default().to_owned();
        if let Ok(mut r) = shared.requests.lock() {
            r.push(line.clone());
        }
        let target = line.split_whitespace().nth(1).unwrap_or("/");
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        if shared.unavailable.load(Ordering::SeqCst) {
            let status = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": "the server is currently unable to handle the request", "reason": "ServiceUnavailable", "code": 503});
            write_response(&mut conn, "503 Service Unavailable", &status.to_string()).await?;
            continue;
        }
        let Some(resource) = Resource::from_path(path) else {
            let status = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404});
            write_response(&mut conn, "404 Not Found", &status.to_string()).await?;
            continue;
        };
        let selector = query_param(query, "fieldSelector");
        if query_param(query, "watch").as_deref() == Some("true")
            || query_param(query, "watch").as_deref() == Some("1")
        {
            // A watch occupies the connection until it ends.
            watch(&mut conn, &shared, resource, query, selector.as_deref()).await?;
            return Ok(());
        }
        let (items, rv) = {
            let Ok(state) = shared.state.lock() else {
                return Ok(());
            };
            let items: Vec<Value> = state
                .objects
                .iter()
                .filter(|((r, _, _), o)| *r == resource && matches_selector(o, selector.as_deref()))
                .map(|(_, o)| o.clone())
                .collect();
            (items, shared.rv.load(Ordering::SeqCst))
        };
        let (kind, api_version) = resource.list_kind();
        let list = json!({"kind": kind, "apiVersion": api_version, "metadata": {"resourceVersion": rv.to_string()}, "items": items});
        write_response(&mut conn, "200 OK", &list.to_string()).await?;
    }
    Ok(())
}

async fn watch(
    conn: &mut TcpStream,
    shared: &Arc<Shared>,
    resource: Resource,
    query: &str,
    selector: Option<&str>,
) -> std::io::Result<()> {
    let since: u64 = query_param(query, "resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let bookmarks = query_param(query, "allowWatchBookmarks").as_deref() == Some("true");
    let timeout = query_param(query, "timeoutSeconds")
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(Duration::from_secs(290), Duration::from_secs);
    // Subscribe before reading history, so nothing falls between the two.
    let mut live = shared.changes.subscribe();
    let mut drops = shared.drops.subscribe();
    conn.write_all(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
    )
    .await?;
    let (backlog, gone) = match shared.state.lock() {
        Ok(state) => (
            state
                .history
                .iter()
                .filter(|c| c.rv > since && c.resource == resource)
                .cloned()
                .collect::<Vec<_>>(),
            since != 0 && since < state.compacted,
        ),
        Err(_) => return Ok(()),
    };
    if gone {
        let status = json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": format!("too old resource version: {since}"), "reason": "Expired", "code": 410}});
        write_chunk(conn, &status.to_string()).await?;
        conn.write_all(b"0\r\n\r\n").await?;
        return Ok(());
    }
    let mut last = since;
    for c in backlog {
        if matches_selector(&c.object, selector) {
            write_chunk(
                conn,
                &json!({"type": c.kind, "object": c.object}).to_string(),
            )
            .await?;
        }
        last = last.max(c.rv);
    }
    let deadline = tokio::time::Instant::now() + timeout;
    let mut ticker = tokio::time::interval(shared.bookmark_every);
    loop {
        tokio::select! {
            change = live.recv() => {
                match change {
                    Ok(c) if c.rv > last && c.resource == resource => {
                        last = c.rv;
                        if matches_selector(&c.object, selector) {
                            write_chunk(conn, &json!({"type": c.kind, "object": c.object}).to_string()).await?;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
            _ = ticker.tick(), if bookmarks => {
                // Only claim versions whose changes this stream has seen.
                let rv = match shared.state.lock() {
                    Ok(_held) if live.is_empty() => shared.rv.load(Ordering::SeqCst),
                    _ => last,
                };
                last = last.max(rv);
                let (kind, api_version) = resource.list_kind();
                let kind = kind.trim_end_matches("List");
                let bookmark = json!({"type": "BOOKMARK", "object": {"kind": kind, "apiVersion": api_version, "metadata": {"resourceVersion": rv.to_string()}}});
                write_chunk(conn, &bookmark.to_string()).await?;
            }
            _ = drops.recv() => {
                // Dropped without a proper end: as a broken connection looks.
                return conn.shutdown().await;
            }
            _ = tokio::time::sleep_until(deadline) => break,
        }
    }
    conn.write_all(b"0\r\n\r\n").await
}
