//! The etcd v3 calls the fleet needs, and no more: ranges, transactions, leases. They go
//! through etcd's own JSON gateway (`POST /v3/...`, the gRPC API as JSON over HTTP/1.1,
//! served on the client port since etcd 3.3), one bounded request per connection, failing
//! over between the cluster's endpoints. A gRPC stack would bring about forty crates and a
//! protobuf compiler to the build for the same six calls. `etcds://` speaks the same over
//! TLS (with a client certificate if etcd asks for one); with a user, the client
//! authenticates for a token first and again whenever etcd says the token is no longer good.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use base64ct::{Base64, Encoding};
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::{FleetError, FleetSettings};
use crate::config::Secret;
use crate::protocol::http::response::parse_response;

/// Longest time one call may take, connect to last byte. Well under a lease's TTL, so a
/// hung endpoint is given up (and the next one tried) while leases still stand.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest answer read (a range over every claim of a big fleet fits many times over).
pub const MAX_ANSWER: usize = 64 << 20;

/// A client for one etcd cluster.
pub struct Etcd {
    endpoints: Vec<(String, u16)>,
    /// The endpoint that answered last: tried first.
    preferred: AtomicUsize,
    /// `etcds://`: TLS to every endpoint.
    tls: Option<TlsConnector>,
    /// The user and password to authenticate with, if etcd's authentication is on.
    user: Option<(String, Secret)>,
    /// The token the last authentication gave.
    token: Mutex<Option<String>>,
}

impl std::fmt::Debug for Etcd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Etcd")
            .field("endpoints", &self.endpoints())
            .field("tls", &self.tls.is_some())
            .field("user", &self.user.as_ref().map(|(u, _)| u))
            .finish_non_exhaustive()
    }
}

/// Whether etcd's error says the token is missing, expired or outdated (authenticating again
/// helps), as against a refusal of the user or the request.
fn stale_token(message: &str) -> bool {
    [
        "invalid auth token",
        "auth store is old",
        "user name is empty",
    ]
    .iter()
    .any(|m| message.contains(m))
}

/// One key as etcd keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kv {
    /// The key.
    pub key: String,
    /// The value.
    pub value: Vec<u8>,
    /// Revision of its last change.
    pub mod_revision: i64,
    /// The lease holding it (0: none).
    pub lease: i64,
}

/// A condition of a transaction.
#[derive(Debug, Clone)]
pub enum Cmp {
    /// No key in `[key, range_end)` (just `key` when `range_end` is `None`) changed after
    /// revision `rev`: what was read at `rev` still holds (a key absent then is still absent).
    Unchanged {
        /// The key, or the start of the range.
        key: String,
        /// The end of the range.
        range_end: Option<String>,
        /// The revision the keys were read at.
        rev: i64,
    },
}

/// A step of a transaction.
#[derive(Debug, Clone)]
pub enum Op {
    /// Sets `key` to `value`, held by `lease` (0: none).
    Put {
        /// The key.
        key: String,
        /// The value.
        value: Vec<u8>,
        /// The lease.
        lease: i64,
    },
    /// Removes `key`.
    Delete {
        /// The key.
        key: String,
    },
    /// Reads `[key, range_end)` (just `key` when `range_end` is `None`).
    Range {
        /// The key, or the start of the range.
        key: String,
        /// The end of the range.
        range_end: Option<String>,
    },
}

impl Cmp {
    /// `key` unchanged since revision `rev`.
    pub fn key_unchanged(key: String, rev: i64) -> Cmp {
        Cmp::Unchanged {
            key,
            range_end: None,
            rev,
        }
    }

    /// No key starting with `prefix` changed (or appeared) since revision `rev`.
    pub fn prefix_unchanged(prefix: String, rev: i64) -> Cmp {
        Cmp::Unchanged {
            range_end: Some(prefix_end(&prefix)),
            key: prefix,
            rev,
        }
    }
}

impl Op {
    /// Reads `key`.
    pub fn get(key: String) -> Op {
        Op::Range {
            key,
            range_end: None,
        }
    }

    /// Reads every key starting with `prefix`.
    pub fn prefix(prefix: String) -> Op {
        Op::Range {
            range_end: Some(prefix_end(&prefix)),
            key: prefix,
        }
    }
}

/// What a transaction did.
#[derive(Debug, Clone)]
pub struct TxnResult {
    /// Whether every condition held (and the success steps ran).
    pub succeeded: bool,
    /// The store's revision after it.
    pub revision: i64,
    /// The keys each `Range` step read, in order.
    pub ranges: Vec<Vec<Kv>>,
}

/// The end of the range holding every key that starts with `prefix`.
pub fn prefix_end(prefix: &str) -> String {
    let mut end = prefix.as_bytes().to_vec();
    // Keys here are text; the last byte of a prefix is never 0xff.
    if let Some(last) = end.last_mut() {
        *last += 1;
    }
    String::from_utf8_lossy(&end).into_owned()
}

fn b64(s: &[u8]) -> String {
    Base64::encode_string(s)
}

fn int(v: &Value) -> i64 {
    match v {
        Value::String(s) => s.parse().unwrap_or(0),
        Value::Number(n) => n.as_i64().unwrap_or(0),
        _ => 0,
    }
}

fn kvs(v: &Value) -> Result<Vec<Kv>, FleetError> {
    let mut out = Vec::new();
    for kv in v["kvs"].as_array().into_iter().flatten() {
        let text = |f: &str| -> Result<Vec<u8>, FleetError> {
            let s = kv[f].as_str().unwrap_or("");
            Base64::decode_vec(s)
                .map_err(|_| FleetError::Etcd(format!("a key's {f} is not base64")))
        };
        out.push(Kv {
            key: String::from_utf8(text("key")?)
                .map_err(|_| FleetError::Etcd("a key is not text".into()))?,
            value: text("value")?,
            mod_revision: int(&kv["mod_revision"]),
            lease: int(&kv["lease"]),
        });
    }
    Ok(out)
}

impl Etcd {
    /// A client for `url`: `etcd://HOST:PORT[,HOST:PORT...]` (the cluster's client
    /// endpoints, plain HTTP, no user).
    pub fn parse(url: &str) -> Result<Etcd, FleetError> {
        let bad = |why: &str| FleetError::Config(format!("registry {url:?}: {why}"));
        let list = url
            .strip_prefix("etcd://")
            .ok_or_else(|| bad("expected etcd://HOST:PORT[,HOST:PORT...]"))?;
        Self::with(url, list, None, None)
    }

    /// The client `settings` describe: `etcd://` or `etcds://` (TLS, trusting the public
    /// roots and `access.ca`, presenting `access.cert` if given), with `access.user` if given.
    pub fn from_settings(settings: &FleetSettings) -> Result<Etcd, FleetError> {
        let url = &settings.registry;
        let a = &settings.access;
        let Some(list) = url.strip_prefix("etcds://") else {
            let mut plain = Self::parse(url)?;
            plain.user = a.user.clone().zip(a.password.clone());
            return Ok(plain);
        };
        let client = a.cert.as_deref().zip(a.key.as_deref());
        let config = crate::tls::registry_client_config(a.ca.as_deref(), client)
            .map_err(|e| FleetError::Config(format!("registry TLS: {e}")))?;
        let user = a.user.clone().zip(a.password.clone());
        Self::with(url, list, Some(TlsConnector::from(config)), user)
    }

    fn with(
        url: &str,
        list: &str,
        tls: Option<TlsConnector>,
        user: Option<(String, Secret)>,
    ) -> Result<Etcd, FleetError> {
        let bad = |why: &str| FleetError::Config(format!("registry {url:?}: {why}"));
        let mut endpoints = Vec::new();
        for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (host, port) = crate::config::parse_host_port(item, Some(2379))
                .map_err(|e| bad(&e.to_string()))?;
            endpoints.push((host, port));
        }
        if endpoints.is_empty() {
            return Err(bad("no endpoint"));
        }
        Ok(Etcd {
            endpoints,
            preferred: AtomicUsize::new(0),
            tls,
            user,
            token: Mutex::new(None),
        })
    }

    /// The endpoints, as `HOST:PORT`.
    pub fn endpoints(&self) -> String {
        let list: Vec<String> = self
            .endpoints
            .iter()
            .map(|(h, p)| format!("{h}:{p}"))
            .collect();
        list.join(",")
    }

    /// Posts `body` to `path` on the first endpoint that answers, authenticated if a user
    /// is set (once more with a fresh token if etcd says the one held is no longer good).
    async fn call(&self, path: &str, body: &Value) -> Result<Value, FleetError> {
        let body = body.to_string();
        let token = self.token().await?;
        let answer = match self.call_as(path, &body, token.as_deref()).await {
            Err(FleetError::Etcd(why)) if self.user.is_some() && stale_token(&why) => {
                *self.token.lock().unwrap_or_else(|p| p.into_inner()) = None;
                let token = self.token().await?;
                self.call_as(path, &body, token.as_deref()).await
            }
            other => other,
        };
        match answer {
            Err(FleetError::Etcd(why)) if why.contains("permission denied") => {
                Err(FleetError::Denied(why))
            }
            other => other,
        }
    }

    /// The token to send, authenticating first if none is held; `None` without a user.
    async fn token(&self) -> Result<Option<String>, FleetError> {
        let Some((user, password)) = &self.user else {
            return Ok(None);
        };
        if let Some(t) = self.token.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            return Ok(Some(t));
        }
        let password = String::from_utf8_lossy(password.expose());
        let body = json!({ "name": user, "password": password }).to_string();
        let v = self
            .call_as("/v3/auth/authenticate", &body, None)
            .await
            .map_err(|e| match e {
                FleetError::Etcd(why) => {
                    FleetError::Denied(format!("authenticating as {user}: {why}"))
                }
                other => other,
            })?;
        let token = v["token"]
            .as_str()
            .filter(|t| !t.is_empty())
            .ok_or_else(|| FleetError::Etcd(format!("authenticating as {user}: no token in {v}")))?
            .to_string();
        *self.token.lock().unwrap_or_else(|p| p.into_inner()) = Some(token.clone());
        Ok(Some(token))
    }

    /// One call with `token`, failing over between endpoints.
    async fn call_as(
        &self,
        path: &str,
        body: &str,
        token: Option<&str>,
    ) -> Result<Value, FleetError> {
        let first = self.preferred.load(Ordering::Relaxed);
        let mut last = String::new();
        for i in 0..self.endpoints.len() {
            let at = (first + i) % self.endpoints.len();
            let (host, port) = &self.endpoints[at];
            let req = Request {
                host,
                port: *port,
                path,
                body,
                token,
            };
            match tokio::time::timeout(CALL_TIMEOUT, req.post(self.tls.as_ref())).await {
                Ok(Ok(v)) => {
                    self.preferred.store(at, Ordering::Relaxed);
                    return Ok(v);
                }
                // etcd answered: another endpoint would answer the same.
                Ok(Err(e @ FleetError::Etcd(_))) => return Err(e),
                Ok(Err(
                    FleetError::Unreachable(e) | FleetError::Config(e) | FleetError::Denied(e),
                )) => last = format!("{host}:{port}: {e}"),
                Err(_) => last = format!("{host}:{port}: no answer within {CALL_TIMEOUT:?}"),
            }
        }
        Err(FleetError::Unreachable(last))
    }

    /// A new lease of `ttl` seconds; its ID.
    pub async fn grant(&self, ttl: u64) -> Result<i64, FleetError> {
        let v = self.call("/v3/lease/grant", &json!({ "TTL": ttl })).await?;
        match int(&v["ID"]) {
            0 => Err(FleetError::Etcd(format!("lease not granted: {v}"))),
            id => Ok(id),
        }
    }

    /// Renews `lease`: the seconds it has again, or `None` if it has expired (or was
    /// revoked): what it held is gone.
    pub async fn keep_alive(&self, lease: i64) -> Result<Option<u64>, FleetError> {
        let v = self
            .call("/v3/lease/keepalive", &json!({ "ID": lease.to_string() }))
            .await?;
        let ttl = int(&v["result"]["TTL"]);
        Ok((ttl > 0).then_some(ttl as u64))
    }

    /// Ends `lease` now, deleting what it holds.
    pub async fn revoke(&self, lease: i64) -> Result<(), FleetError> {
        self.call("/v3/lease/revoke", &json!({ "ID": lease.to_string() }))
            .await
            .map(drop)
    }

    /// Every key starting with `prefix`, and the revision they were read at.
    pub async fn range_prefix(&self, prefix: &str) -> Result<(Vec<Kv>, i64), FleetError> {
        let v = self
            .call(
                "/v3/kv/range",
                &json!({ "key": b64(prefix.as_bytes()), "range_end": b64(prefix_end(prefix).as_bytes()) }),
            )
            .await?;
        Ok((kvs(&v)?, int(&v["header"]["revision"])))
    }

    /// Runs `then` if every condition in `when` holds, else `otherwise`; atomically.
    pub async fn txn(
        &self,
        when: &[Cmp],
        then: &[Op],
        otherwise: &[Op],
    ) -> Result<TxnResult, FleetError> {
        let compare: Vec<Value> = when
            .iter()
            .map(|c| match c {
                Cmp::Unchanged {
                    key,
                    range_end,
                    rev,
                } => {
                    let mut v = json!({
                        "key": b64(key.as_bytes()),
                        "target": "MOD",
                        "result": "LESS",
                        "mod_revision": (rev + 1).to_string(),
                    });
                    if let Some(end) = range_end {
                        v["range_end"] = b64(end.as_bytes()).into();
                    }
                    v
                }
            })
            .collect();
        let ops = |ops: &[Op]| -> Vec<Value> {
            ops.iter()
                .map(|op| match op {
                    Op::Put { key, value, lease } => json!({ "request_put": {
                        "key": b64(key.as_bytes()), "value": b64(value), "lease": lease.to_string()
                    }}),
                    Op::Delete { key } => {
                        json!({ "request_delete_range": { "key": b64(key.as_bytes()) } })
                    }
                    Op::Range { key, range_end } => {
                        let mut v = json!({ "key": b64(key.as_bytes()) });
                        if let Some(end) = range_end {
                            v["range_end"] = b64(end.as_bytes()).into();
                        }
                        json!({ "request_range": v })
                    }
                })
                .collect()
        };
        let v = self
            .call(
                "/v3/kv/txn",
                &json!({ "compare": compare, "success": ops(then), "failure": ops(otherwise) }),
            )
            .await?;
        let mut ranges = Vec::new();
        for r in v["responses"].as_array().into_iter().flatten() {
            if let Some(range) = r.get("response_range") {
                ranges.push(kvs(range)?);
            }
        }
        Ok(TxnResult {
            succeeded: v["succeeded"].as_bool().unwrap_or(false),
            revision: int(&v["header"]["revision"]),
            ranges,
        })
    }
}

/// One `POST` to one endpoint.
struct Request<'a> {
    host: &'a str,
    port: u16,
    path: &'a str,
    body: &'a str,
    token: Option<&'a str>,
}

impl Request<'_> {
    /// Sends the request (over TLS with `tls`); the answer's JSON.
    async fn post(&self, tls: Option<&TlsConnector>) -> Result<Value, FleetError> {
        let tcp = TcpStream::connect((self.host, self.port))
            .await
            .map_err(|e| FleetError::Unreachable(format!("connecting: {e}")))?;
        let Some(tls) = tls else {
            return self.exchange(tcp).await;
        };
        let name = rustls_pki_types::ServerName::try_from(self.host.to_string())
            .map_err(|e| FleetError::Config(format!("server name {}: {e}", self.host)))?;
        let stream = tls
            .connect(name, tcp)
            .await
            .map_err(|e| FleetError::Unreachable(format!("TLS: {e}")))?;
        self.exchange(stream).await
    }

    async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        mut s: S,
    ) -> Result<Value, FleetError> {
        let net = |what: &str, e: std::io::Error| FleetError::Unreachable(format!("{what}: {e}"));
        let (host, port, path, body) = (self.host, self.port, self.path, self.body);
        let auth = self
            .token
            .map_or(String::new(), |t| format!("Authorization: {t}\r\n"));
        let req = format!(
            "POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes())
            .await
            .map_err(|e| net("sending", e))?;
        let mut raw = Vec::new();
        let mut chunk = [0u8; 16384];
        loop {
            let n = match s.read(&mut chunk).await {
                Ok(n) => n,
                // A TLS peer that closes without close_notify after a whole answer (etcd
                // does, with `Connection: close`): the answer is judged on what came.
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !raw.is_empty() => 0,
                Err(e) => return Err(net("reading", e)),
            };
            if n == 0 {
                break;
            }
            raw.extend_from_slice(&chunk[..n]);
            if raw.len() > MAX_ANSWER {
                return Err(FleetError::Etcd(format!(
                    "answer larger than {MAX_ANSWER} bytes"
                )));
            }
        }
        let resp = parse_response(&raw).map_err(|e| FleetError::Unreachable(e.to_string()))?;
        let v: Value = serde_json::from_slice(&resp.body).map_err(|e| {
            let start = String::from_utf8_lossy(&resp.body[..resp.body.len().min(120)]);
            FleetError::Etcd(format!(
                "{path}: {} answer is not JSON ({e}): {start:?}",
                resp.status
            ))
        })?;
        if resp.status != 200 {
            let why = v["message"].as_str().or(v["error"].as_str()).unwrap_or("");
            return Err(FleetError::Etcd(format!("{path}: {} {why}", resp.status)));
        }
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_list_endpoints() {
        let e = Etcd::parse("etcd://127.0.0.1:2379,[::1]:23790, 10.0.0.2").unwrap();
        assert_eq!(e.endpoints(), "127.0.0.1:2379,::1:23790,10.0.0.2:2379");
        for bad in ["http://a:1", "etcd://", "etcd://a:x"] {
            assert!(Etcd::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_prefix_ends_after_its_last_key() {
        assert_eq!(prefix_end("/rt/ports/"), "/rt/ports0");
        assert!("/rt/ports/99999".as_bytes() < prefix_end("/rt/ports/").as_bytes());
    }

    #[test]
    fn kvs_decode_and_reject_garbage() {
        let v =
            json!({"kvs": [{"key": "YQ==", "value": "Yg==", "mod_revision": "7", "lease": "9"}]});
        let got = kvs(&v).unwrap();
        assert_eq!(
            got,
            vec![Kv {
                key: "a".into(),
                value: b"b".to_vec(),
                mod_revision: 7,
                lease: 9
            }]
        );
        assert!(kvs(&json!({"kvs": [{"key": "!!"}]})).is_err());
        assert!(kvs(&json!({})).unwrap().is_empty());
    }
}
