//! The InfluxDB-compatible HTTP API on hyper: writes (v2 and v1), ping,
//! health, ready, status and metrics. Answers use InfluxDB's shapes so
//! Telegraf, client libraries and InfluxDB's own replication treat the agent
//! as an InfluxDB: header names go out in InfluxDB's spelling
//! (`X-Influxdb-Version`, which some clients look up case-sensitively), and
//! the query and management paths clients call answer in the API's error
//! shape that this agent only takes writes, and where it sends them.

use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use log::{debug, warn};
use serde_json::json;
use tokio::net::TcpListener;

use super::body::{self, BodyError, Encoding};
use super::conns::Slots;
use super::{auth, Destination, Ingest, Routing, WriteError};
use crate::lineproto::Precision;
use crate::queue::QueueError;
use crate::status;

/// Connections served at once; past it the server stops accepting (see
/// `ingest::conns`).
pub const MAX_CONNECTIONS: usize = 512;

/// While a new connection waits for a slot, how often an idle one is chosen
/// again to be closed (see `ingest::conns`).
const EVICT_AGAIN: Duration = Duration::from_millis(100);

/// Descriptors kept for everything but API connections: the queue's files,
/// one or two sockets per replication's remote, DNS, tailed files and WAL
/// segments, logs. Connections get what the descriptor limit leaves beyond
/// this, up to [`MAX_CONNECTIONS`], so a flood of clients never makes
/// shipping or a source fail with "Too many open files".
pub const DESCRIPTOR_RESERVE: u64 = 128;

/// Largest read buffer of a connection (hyper's minimum is 8 KiB).
const READ_BUFFER: usize = 64 << 10;

/// The connection cap under the process's descriptor limit (soft
/// `RLIMIT_NOFILE`): [`MAX_CONNECTIONS`], less when the limit leaves less
/// than that beyond [`DESCRIPTOR_RESERVE`].
pub fn connection_cap() -> usize {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes only the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return MAX_CONNECTIONS;
    }
    // rlim_t is 32 bits wide on 32-bit ARM.
    #[allow(clippy::unnecessary_cast)]
    let soft = limit.rlim_cur as u64;
    let left = soft.saturating_sub(DESCRIPTOR_RESERVE).max(8);
    usize::try_from(left).map_or(MAX_CONNECTIONS, |l| l.min(MAX_CONNECTIONS))
}

type Resp = Response<Full<Bytes>>;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Api {
    V1,
    V2,
}

/// The API a path belongs to, for the shape of its errors and whether `p=`
/// counts: v1 for `/write` and `/query`, v2 for everything else.
fn api_of(path: &str) -> Api {
    match path {
        "/write" | "/query" => Api::V1,
        _ => Api::V2,
    }
}

/// Serves until `shutdown` resolves, then stops accepting, lets requests in
/// progress finish (their lines are committed before they are answered) for
/// up to `drain`, and returns.
pub async fn serve(
    listener: TcpListener,
    ingest: Arc<Ingest>,
    shutdown: impl Future<Output = ()>,
    drain: Duration,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let slots = Slots::new(connection_cap());
    if slots.cap() < MAX_CONNECTIONS {
        warn!(
            "serving at most {} connections: the open-file limit leaves no more beside the {DESCRIPTOR_RESERVE} descriptors kept for the queue, shipping and sources (raise LimitNOFILE / ulimit -n)",
            slots.cap()
        );
    }
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new());
    // hyper writes header names in lower case unless told otherwise; title
    // case is InfluxDB's own spelling of every header the agent sends.
    builder.title_case_headers(true);
    // The read buffer of each connection: hyper lets it grow to about 400 kB
    // while a large body streams in, outside the request memory budget; 64
    // connections streaming at once then held 26 MB in these buffers alone.
    builder.max_buf_size(READ_BUFFER);
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors and the like: back off briefly.
                    warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let held = match slots.try_take() {
            Some(h) => h,
            None => {
                // Full, and someone is waiting: close an idle connection to
                // make room, then wait for a slot without accepting more.
                // The choice is made again while waiting: a connection
                // chosen just as a request arrived on it is spared, and
                // connections busy now may be idle soon.
                if !slots.evict_one() {
                    debug!(
                        "{} connections busy: {peer} waits for one to finish",
                        slots.cap()
                    );
                }
                let taken = loop {
                    tokio::select! {
                        h = slots.take() => break Some(h),
                        () = tokio::time::sleep(EVICT_AGAIN) => {
                            slots.evict_one();
                        }
                        () = &mut shutdown => break None,
                    }
                };
                let Some(h) = taken else { break };
                h
            }
        };
        let io = TokioIo::new(stream);
        // A client has `header_timeout` to send each request's headers (a
        // keep-alive connection idle that long is closed) and `body_timeout`
        // for its body (see `write`); both follow config reloads.
        builder.header_read_timeout(ingest.routing().header_timeout);
        let ingest = ingest.clone();
        let conn = held.conn.clone();
        let conn_slots = slots.clone();
        let service = service_fn(move |req| {
            let ingest = ingest.clone();
            let conn = conn.clone();
            let slots = conn_slots.clone();
            async move {
                let authorised = request_authorised(&ingest, &req);
                let _busy = conn.request(&slots, authorised);
                let mut r = handle(&ingest, req).await;
                version_headers(&mut r);
                Ok::<_, Infallible>(r)
            }
        });
        let served = graceful.watch(builder.serve_connection(io, service));
        tokio::spawn(async move {
            tokio::pin!(served);
            loop {
                tokio::select! {
                    r = &mut served => {
                        if let Err(e) = r {
                            debug!("connection from {peer}: {e}");
                        }
                        break;
                    }
                    () = held.conn.evicted() => if held.conn.still_idle() {
                        debug!("closed the idle connection from {peer} to make room for another");
                        break;
                    },
                }
            }
            drop(held);
        });
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(drain) => warn!("requests still open after {drain:?}; closing them"),
    }
}

/// Whether a request counts as an authorised writer's for eviction (see
/// `ingest::conns`): it passes the browser checks and offers a configured token
/// (any request does when no token is configured).
fn request_authorised(ingest: &Ingest, req: &Request<Incoming>) -> bool {
    let api = api_of(req.uri().path());
    browser_refusal(&ingest.routing(), req.headers()).is_none() && authorized(ingest, req, api)
}

/// Keeps web pages out (see [`auth`]), answers the CORS preflight of an
/// allowed origin, then routes; an allowed origin may read the answer.
async fn handle(ingest: &Ingest, req: Request<Incoming>) -> Resp {
    let api = api_of(req.uri().path());
    let origin = req.headers().get(header::ORIGIN).cloned();
    if let Some(mut refused) = browser_gate(ingest, &req, api) {
        // The body, if any, was not read: the connection cannot carry
        // another request.
        refused
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        return refused;
    }
    let mut r = if origin.is_some() && req.method() == Method::OPTIONS {
        preflight()
    } else {
        route(ingest, req).await
    };
    if let Some(origin) = origin {
        let h = r.headers_mut();
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        h.insert(header::VARY, HeaderValue::from_static("Origin"));
    }
    r
}

/// A 403 for a request from a web page the operator did not allow: an
/// `Origin` not listed, or, on a listener without tokens, a `Host` that is
/// neither loopback nor listed (DNS rebinding).
fn browser_gate(ingest: &Ingest, req: &Request<Incoming>, api: Api) -> Option<Resp> {
    let message = browser_refusal(&ingest.routing(), req.headers())?;
    ingest.stats.refused_browser.fetch_add(1, Ordering::Relaxed);
    debug!(
        "refused {} {}: {message}",
        req.method(),
        shown(req.uri().path())
    );
    Some(error(api, StatusCode::FORBIDDEN, "forbidden", &message))
}

/// Why a request with these headers is refused as a web page's, if it is.
fn browser_refusal(routing: &Routing, headers: &http::HeaderMap) -> Option<String> {
    let guard = &routing.browsers;
    let message = if let Some(origin) = headers
        .get(header::ORIGIN)
        .filter(|o| !auth::origin_allowed(o.as_bytes(), &guard.allowed_origins))
    {
        format!(
            "requests from web pages are refused: origin {:?} is not in listen.allowed_origins",
            shown(&String::from_utf8_lossy(origin.as_bytes()))
        )
    } else if routing.tokens.is_empty()
        && !auth::host_allowed(
            headers.get(header::HOST).map(HeaderValue::as_bytes),
            &guard.allowed_hosts,
        )
    {
        let host = headers
            .get(header::HOST)
            .map(|h| String::from_utf8_lossy(h.as_bytes()).into_owned())
            .unwrap_or_default();
        format!(
            "host {:?} is not allowed: without listen.tokens, only loopback names (localhost, 127.0.0.1, [::1]) and listen.allowed_hosts are served",
            shown(&host)
        )
    } else {
        return None;
    };
    Some(message)
}

/// The CORS preflight of an allowed origin: the methods and headers a page
/// may use (writes with a token, gzip bodies, status, dead letters).
fn preflight() -> Resp {
    let mut r = no_content();
    let h = r.headers_mut();
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET, HEAD, POST, DELETE"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("Authorization, Content-Type, Content-Encoding"),
    );
    h.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("600"),
    );
    r
}

async fn route(ingest: &Ingest, req: Request<Incoming>) -> Resp {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    match (method.clone(), path.as_str()) {
        (Method::POST, "/api/v2/write") => write(ingest, req, Api::V2).await,
        (Method::POST, "/write") => write(ingest, req, Api::V1).await,
        (Method::GET | Method::HEAD, "/ping") => ping(),
        (Method::GET | Method::HEAD, "/ready") => ready(ingest),
        (Method::GET | Method::HEAD, "/health") => json_response(
            StatusCode::OK,
            &json!({
                "name": "edge-replicator",
                "message": "ready for writes",
                "status": "pass",
                "checks": [],
                "version": env!("CARGO_PKG_VERSION"),
            }),
        ),
        (Method::GET, "/api/v2/replications") => {
            if !authorized(ingest, &req, Api::V2) {
                return unauthorized(ingest, Api::V2);
            }
            let answer = status::report(
                &ingest.routing().statuses,
                &ingest.sources(),
                &ingest.link.readings(),
            );
            // Through a `Value`, the keys come out sorted, as they always did.
            let answer = serde_json::to_value(answer).expect("a status report is JSON");
            json_response(StatusCode::OK, &answer)
        }
        (_, p) if held_path(p).is_some() => {
            if !authorized(ingest, &req, Api::V2) {
                return unauthorized(ingest, Api::V2);
            }
            held(ingest, &method, p).await
        }
        (_, p)
            if p.starts_with("/api/v2/replications/")
                && (p.ends_with("/dead-letter") || p.ends_with("/dead-letter/replay")) =>
        {
            if !authorized(ingest, &req, Api::V2) {
                return unauthorized(ingest, Api::V2);
            }
            let with_lines = get(&query_pairs(&req), "lines") == Some("true");
            dead_letter(ingest, &method, p, with_lines).await
        }
        (Method::GET, "/metrics") => {
            if !ingest.routing().browsers.metrics_open && !authorized(ingest, &req, Api::V2) {
                return unauthorized(ingest, Api::V2);
            }
            let mut text = status::metrics_text(&ingest.routing().statuses, &ingest.stats);
            text.push_str(&status::sources_metrics_text(&ingest.sources()));
            text.push_str(&status::budget_metrics_text(&ingest.link.readings()));
            let mut r = Response::new(Full::new(Bytes::from(text)));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            r
        }
        (
            _,
            "/api/v2/write"
            | "/write"
            | "/ping"
            | "/health"
            | "/ready"
            | "/api/v2/replications"
            | "/metrics",
        ) => error(
            Api::V2,
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed",
            &format!("{method} is not allowed on {}", shown(&path)),
        ),
        (_, "/query") => write_only(ingest, req, Api::V1).await,
        (_, p)
            if (p == "/api/v2" || p.starts_with("/api/v2/"))
                && !p.starts_with("/api/v2/replications") =>
        {
            write_only(ingest, req, Api::V2).await
        }
        _ => error(
            Api::V2,
            StatusCode::NOT_FOUND,
            "not found",
            &format!("path {} not found", shown(&path)),
        ),
    }
}

/// Whether `req` offers a configured token (or none are configured). The
/// `p=` query credential counts only on the v1 endpoints, whose clients
/// need it: a token in a URL ends up in proxy and browser histories.
fn authorized(ingest: &Ingest, req: &Request<Incoming>, api: Api) -> bool {
    let query = query_pairs(req);
    let password = match api {
        Api::V1 => get(&query, "p"),
        Api::V2 => None,
    };
    auth::allowed(
        &ingest.routing().tokens,
        auth::offered(req.headers(), password).as_deref(),
    )
}

/// A path under `/api/v2/replications/<name>/held`: the name and what
/// follows `held` (both still URL-encoded).
fn held_path(path: &str) -> Option<(&str, &str)> {
    let rest = path.strip_prefix("/api/v2/replications/")?;
    let (name, tail) = rest.split_once('/')?;
    match tail.strip_prefix("held")? {
        "" => Some((name, "")),
        t => Some((name, t.strip_prefix('/')?)),
    }
}

/// One URL-encoded path segment, decoded.
fn decoded(segment: &str) -> String {
    form_urlencoded::parse(format!("n={segment}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

/// Held destinations of a replication: `GET .../held` lists them, `POST
/// .../held/<destination>/release` retries one now, `POST
/// .../held/<destination>/dead-letter` moves its lines to the dead-letter
/// store. The destination is the local bucket its lines were written to
/// (`db` or `db/rp`, URL-encoded).
async fn held(ingest: &Ingest, method: &Method, path: &str) -> Resp {
    let not_found = |what: String| error(Api::V2, StatusCode::NOT_FOUND, "not found", &what);
    let Some((name, tail)) = held_path(path) else {
        return not_found(format!("path {} not found", shown(path)));
    };
    let name = decoded(name);
    let Some(status) = ingest.routing().status(&name).cloned() else {
        return not_found(format!("replication \"{}\" not found", shown(&name)));
    };
    let repl = status.queue.clone();
    let (dest, action) = match tail.split_once('/') {
        Some((d, a)) if !d.is_empty() => (decoded(d), a),
        _ if tail.is_empty() => (String::new(), "list"),
        _ => return not_found(format!("path {} not found", shown(path))),
    };
    let allowed = matches!(
        (method, action),
        (&Method::GET, "list") | (&Method::POST, "release" | "dead-letter")
    );
    if !matches!(action, "list" | "release" | "dead-letter") {
        return not_found(format!("path {} not found", shown(path)));
    }
    if !allowed {
        return error(
            Api::V2,
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed",
            &format!("{method} is not allowed on {}", shown(path)),
        );
    }
    if action == "list" {
        let list: Vec<_> = repl.held().iter().map(status::held_report).collect();
        return json_response(
            StatusCode::OK,
            &json!({ "replication": repl.name, "heldDestinations": list }),
        );
    }
    if !repl.held().iter().any(|h| h.bucket == dest) {
        return not_found(format!(
            "destination \"{}\" of replication \"{}\" is not held",
            shown(&dest),
            shown(&name)
        ));
    }
    if action == "release" {
        repl.release(&dest);
        return json_response(
            StatusCode::OK,
            &json!({ "replication": repl.name, "destination": dest, "released": true }),
        );
    }
    let queue = ingest.queue.clone();
    let d = dest.clone();
    let result = tokio::task::spawn_blocking(move || queue.dead_letter_held(&repl, &d)).await;
    match result {
        Ok(Ok(n)) => json_response(
            StatusCode::OK,
            &json!({ "replication": name, "destination": dest, "deadLetteredLines": n }),
        ),
        Ok(Err(e)) => internal_error(e),
        Err(e) => internal_error(e),
    }
}

/// `GET .../dead-letter[?lines=true]` lists (with the refused lines),
/// `DELETE .../dead-letter` purges, `POST .../dead-letter/replay` replays a
/// replication's dead letters.
async fn dead_letter(ingest: &Ingest, method: &Method, path: &str, with_lines: bool) -> Resp {
    let rest = path
        .strip_prefix("/api/v2/replications/")
        .unwrap_or_default();
    let (name, action) = match rest.rsplit_once("/dead-letter") {
        Some((name, "")) => (name, "list"),
        Some((name, "/replay")) => (name, "replay"),
        _ => {
            return error(
                Api::V2,
                StatusCode::NOT_FOUND,
                "not found",
                &format!("path {} not found", shown(path)),
            )
        }
    };
    let name = form_urlencoded::parse(format!("n={name}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default();
    let Some(status) = ingest.routing().status(&name).cloned() else {
        return error(
            Api::V2,
            StatusCode::NOT_FOUND,
            "not found",
            &format!("replication \"{}\" not found", shown(&name)),
        );
    };
    enum Op {
        List,
        Purge,
        Replay,
    }
    let op = match (method, action) {
        (&Method::GET, "list") => Op::List,
        (&Method::DELETE, "list") => Op::Purge,
        (&Method::POST, "replay") => Op::Replay,
        _ => {
            return error(
                Api::V2,
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed",
                &format!("{method} is not allowed on {}", shown(path)),
            )
        }
    };
    let queue = ingest.queue.clone();
    let repl = status.queue.clone();
    let result = tokio::task::spawn_blocking(move || match op {
        Op::List => queue
            .dead_letters(&repl, with_lines)
            .map(|list| json!({ "replication": repl.name, "deadLetters": list })),
        Op::Purge => queue
            .purge_dead_letters(&repl)
            .map(|n| json!({ "replication": repl.name, "purgedLines": n })),
        Op::Replay => {
            let n = queue.replay_dead_letters(&repl)?;
            repl.data.notify();
            Ok(json!({ "replication": repl.name, "replayedLines": n }))
        }
    })
    .await;
    match result {
        Ok(Ok(v)) => json_response(StatusCode::OK, &v),
        Ok(Err(e)) => internal_error(e),
        Err(e) => internal_error(e),
    }
}

fn ping() -> Resp {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::NO_CONTENT;
    r
}

/// InfluxDB sends its version and build on every answer; clients read them
/// from `/ping` mostly, but not only.
fn version_headers(r: &mut Resp) {
    let h = r.headers_mut();
    h.insert(
        "X-Influxdb-Version",
        HeaderValue::from_static(concat!("edge-replicator-", env!("CARGO_PKG_VERSION"))),
    );
    h.insert("X-Influxdb-Build", HeaderValue::from_static("OSS"));
}

/// `GET /ready` as InfluxDB 2.x answers it: the official clients' `ready()`
/// reads `status`, `started` and `up`.
fn ready(ingest: &Ingest) -> Resp {
    let (started, at) = ingest.started;
    json_response(
        StatusCode::OK,
        &json!({
            "status": "ready",
            "started": humantime::format_rfc3339_micros(started).to_string(),
            "up": go_duration(at.elapsed()),
        }),
    )
}

/// A duration as Go's `time.Duration` prints it (`1h2m3.5s`, `250ms`), the
/// form InfluxDB's `up` has.
fn go_duration(d: Duration) -> String {
    let ns = d.as_nanos();
    if ns == 0 {
        return "0s".into();
    }
    let fraction = |value: u128, digits: u32| {
        let unit = 10u128.pow(digits);
        let frac = format!("{:0width$}", value % unit, width = digits as usize);
        let frac = frac.trim_end_matches('0');
        if frac.is_empty() {
            format!("{}", value / unit)
        } else {
            format!("{}.{frac}", value / unit)
        }
    };
    if ns < 1_000 {
        return format!("{ns}ns");
    }
    if ns < 1_000_000 {
        return format!("{}µs", fraction(ns, 3));
    }
    if ns < 1_000_000_000 {
        return format!("{}ms", fraction(ns, 6));
    }
    let secs = d.as_secs();
    let (h, m) = (secs / 3600, secs / 60 % 60);
    let s = fraction(ns % 60_000_000_000, 9);
    match (h, m) {
        (0, 0) => format!("{s}s"),
        (0, m) => format!("{m}m{s}s"),
        (h, m) => format!("{h}h{m}m{s}s"),
    }
}

/// A query or management call (`/query`, `/api/v2/query`, `/api/v2/buckets`,
/// ...): 501 in the API's error shape, saying that this agent only takes
/// writes and, to a client allowed to write, where they go. Its body (a
/// query) is read first: hyper closes a connection whose request body was
/// not read, and a client that pools connections (the official ones) would
/// send its next request on a connection that is closing.
async fn write_only(ingest: &Ingest, req: Request<Incoming>, api: Api) -> Resp {
    let answer = write_only_answer(ingest, &req, api);
    discard_body(req.into_body()).await;
    answer
}

/// What remains of a small request body, read and dropped: at most
/// [`DISCARD_MAX`] bytes, for at most [`DISCARD_WAIT`].
async fn discard_body(body: Incoming) {
    use http_body_util::{BodyExt, Limited};
    let _ = tokio::time::timeout(DISCARD_WAIT, Limited::new(body, DISCARD_MAX).collect()).await;
}

/// A query is small: a larger body is not read, and its connection closes.
const DISCARD_MAX: usize = 64 << 10;
const DISCARD_WAIT: Duration = Duration::from_secs(2);

fn write_only_answer(ingest: &Ingest, req: &Request<Incoming>, api: Api) -> Resp {
    let mut message = format!(
        "edge-replicator is a write-only agent: {} {} is not served here. It takes writes \
         (POST /api/v2/write, POST /write) and forwards them",
        req.method(),
        shown(req.uri().path())
    );
    let routing = ingest.routing();
    if routing.routes.is_empty() {
        message.push_str(" (no replication is configured)");
    } else if authorized(ingest, req, api) {
        let to: Vec<String> = routing
            .routes
            .iter()
            .map(|r| {
                format!(
                    "bucket \"{}\" to {}",
                    shown(&r.config.local_bucket),
                    r.destination
                )
            })
            .collect();
        message.push_str(": ");
        message.push_str(&to.join("; "));
        message.push_str("; query the data there");
    } else {
        message.push_str("; query the data at the remote it forwards to");
    }
    error(
        api,
        StatusCode::NOT_IMPLEMENTED,
        "not implemented",
        &message,
    )
}

fn query_pairs(req: &Request<Incoming>) -> Vec<(String, String)> {
    form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
        .into_owned()
        .collect()
}

fn get<'a>(q: &'a [(String, String)], key: &str) -> Option<&'a str> {
    q.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

async fn write(ingest: &Ingest, req: Request<Incoming>, api: Api) -> Resp {
    let mut body_read = false;
    let mut resp = write_unclosed(ingest, req, api, &mut body_read).await;
    if !body_read {
        // Answered without reading the body (auth, bucket, parameters, or a
        // body that could not be read): the connection cannot carry another
        // request, so say so rather than let a client reuse it and fail.
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

async fn write_unclosed(
    ingest: &Ingest,
    req: Request<Incoming>,
    api: Api,
    body_read: &mut bool,
) -> Resp {
    ingest.stats.requests.fetch_add(1, Ordering::Relaxed);
    let routing = ingest.routing();
    let query = query_pairs(&req);
    if !authorized(ingest, &req, api) {
        return unauthorized(ingest, api);
    }
    let (dest, precision) = match api {
        Api::V2 => {
            let Some(bucket) = get(&query, "bucket").filter(|b| !b.is_empty()) else {
                return error(
                    api,
                    StatusCode::BAD_REQUEST,
                    "invalid",
                    "bucket is required (?bucket=NAME)",
                );
            };
            let precision = match get(&query, "precision").unwrap_or("") {
                "" => Some(Precision::Nanoseconds),
                p => Precision::from_v2(p),
            };
            (Destination::bucket(bucket), precision)
        }
        Api::V1 => {
            let Some(db) = get(&query, "db").filter(|b| !b.is_empty()) else {
                return error(
                    api,
                    StatusCode::BAD_REQUEST,
                    "invalid",
                    "database is required (?db=NAME)",
                );
            };
            let precision = match get(&query, "precision").unwrap_or("") {
                "" => Some(Precision::Nanoseconds),
                p => Precision::from_v1(p),
            };
            (
                Destination::v1(db, get(&query, "rp").unwrap_or("")),
                precision,
            )
        }
    };
    let Some(precision) = precision else {
        let p = get(&query, "precision").unwrap_or("");
        return error(
            api,
            StatusCode::BAD_REQUEST,
            "invalid",
            &format!("invalid precision \"{}\"", shown(p)),
        );
    };
    if routing.targets(&dest).is_empty() {
        return error(
            api,
            StatusCode::NOT_FOUND,
            "not found",
            &format!("bucket \"{}\" not found", shown(&dest.bucket)),
        );
    }
    let encoding = req
        .headers()
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok());
    let encoding = match Encoding::from_header(encoding) {
        Ok(e) => e,
        Err(e) => {
            return error(
                api,
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "invalid",
                &e.to_string(),
            )
        }
    };
    // Counted as being prepared until its lines reach the queue writer, so
    // the commit it joins can wait for it (see `queue::Queue::preparing`).
    let preparing = ingest.queue.preparing();
    let limit = routing.max_request_memory;
    let mut charge = ingest.memory.charge();
    let body = match body::read(
        req.into_body(),
        encoding,
        routing.max_body_size,
        routing.body_timeout,
        body::Charged {
            charge: &mut charge,
            limit,
        },
    )
    .await
    {
        Ok(b) => {
            *body_read = true;
            b
        }
        Err(e) => {
            let status = match e {
                BodyError::TooLarge(_) => {
                    ingest
                        .stats
                        .refused_too_large
                        .fetch_add(1, Ordering::Relaxed);
                    StatusCode::PAYLOAD_TOO_LARGE
                }
                BodyError::Timeout(_) => StatusCode::REQUEST_TIMEOUT,
                BodyError::Busy(_) => return memory_busy(ingest, api, &e),
                BodyError::UnsupportedEncoding(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
                BodyError::BadGzip(_) | BodyError::Read(_) => StatusCode::BAD_REQUEST,
            };
            let code = if status == StatusCode::PAYLOAD_TOO_LARGE {
                "request too large"
            } else {
                "invalid"
            };
            return error(api, status, code, &e.to_string());
        }
    };
    // The normalised lines: at most a timestamp more per line. A write
    // queued compressed holds one segment's lines and the segments made
    // from them instead, which incompressible lines take as many bytes as.
    let normalised = body.len() as u64 + body.len() as u64 / 8 + 32;
    if charge.grow(normalised, limit).await.is_err() {
        return memory_busy(ingest, api, &BodyError::Busy(limit));
    }
    match ingest.write(&dest, precision, body, Some(preparing)).await {
        Ok(_) => no_content(),
        Err(WriteError::NoRoute(b)) => error(
            api,
            StatusCode::NOT_FOUND,
            "not found",
            &format!("bucket \"{}\" not found", shown(&b)),
        ),
        Err(WriteError::Invalid { message, .. }) => {
            error(api, StatusCode::BAD_REQUEST, "invalid", &message)
        }
        Err(WriteError::Queue(e)) => queue_error(ingest, api, e),
    }
}

/// 503 with `Retry-After: retry_after` seconds.
fn unavailable(api: Api, message: &str, retry_after: &'static str) -> Resp {
    let mut r = error(api, StatusCode::SERVICE_UNAVAILABLE, "unavailable", message);
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static(retry_after));
    r
}

/// 503 for a write that did not get its memory within `budget::WAIT`.
fn memory_busy(ingest: &Ingest, api: Api, e: &BodyError) -> Resp {
    ingest.stats.refused_memory.fetch_add(1, Ordering::Relaxed);
    unavailable(api, &e.to_string(), "2")
}

fn queue_error(ingest: &Ingest, api: Api, e: QueueError) -> Resp {
    match &e {
        QueueError::Full { .. } => {
            ingest.stats.refused_full.fetch_add(1, Ordering::Relaxed);
            unavailable(api, &e.to_string(), "5")
        }
        QueueError::TooLarge { .. } => {
            ingest
                .stats
                .refused_too_large
                .fetch_add(1, Ordering::Relaxed);
            error(
                api,
                StatusCode::PAYLOAD_TOO_LARGE,
                "request too large",
                &e.to_string(),
            )
        }
        QueueError::StorageFull(_) => {
            ingest.stats.refused_full.fetch_add(1, Ordering::Relaxed);
            warn!("write refused: {e}");
            let mut r = error(
                api,
                StatusCode::INSUFFICIENT_STORAGE,
                "unavailable",
                &e.to_string(),
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("30"));
            r
        }
        QueueError::Closed => {
            let mut r = error(
                api,
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "the agent is shutting down",
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
            r
        }
        _ => {
            warn!("write failed: {e}");
            error(
                api,
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal error",
                &e.to_string(),
            )
        }
    }
}

fn unauthorized(ingest: &Ingest, api: Api) -> Resp {
    ingest.stats.refused_auth.fetch_add(1, Ordering::Relaxed);
    let mut r = error(
        api,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "unauthorized access",
    );
    r.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Token"));
    r
}

fn no_content() -> Resp {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::NO_CONTENT;
    r
}

/// An error in the API's shape: v2 `{"code","message"}`, v1 `{"error"}`.
/// 500 in the v2 shape, for a queue operation that failed or whose task
/// did.
fn internal_error(e: impl std::fmt::Display) -> Resp {
    error(
        Api::V2,
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal error",
        &e.to_string(),
    )
}

fn error(api: Api, status: StatusCode, code: &str, message: &str) -> Resp {
    let body = match api {
        Api::V2 => json!({ "code": code, "message": message }),
        Api::V1 => json!({ "error": message }),
    };
    let mut r = json_response(status, &body);
    if api == Api::V1 {
        r.headers_mut().insert(
            "X-Influxdb-Error",
            HeaderValue::from_str(&message.replace(['\r', '\n'], " "))
                .unwrap_or(HeaderValue::from_static("error")),
        );
    }
    r
}

/// A value from the request for an error message, cut short: a client's
/// 100 kB bucket name is not worth echoing into a body or a header.
fn shown(s: &str) -> std::borrow::Cow<'_, str> {
    const MAX: usize = 100;
    match s.char_indices().nth(MAX) {
        Some((i, _)) => format!("{}...", &s[..i]).into(),
        None => s.into(),
    }
}

fn json_response(status: StatusCode, body: &serde_json::Value) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uptime_is_spelled_as_go_spells_durations() {
        for (d, want) in [
            (Duration::ZERO, "0s"),
            (Duration::from_nanos(12), "12ns"),
            (Duration::from_micros(800), "800µs"),
            (Duration::from_micros(1500), "1.5ms"),
            (Duration::from_millis(45_001), "45.001s"),
            (Duration::from_secs(123), "2m3s"),
            (Duration::from_millis(3_723_500), "1h2m3.5s"),
            (Duration::from_secs(90_000), "25h0m0s"),
        ] {
            assert_eq!(go_duration(d), want, "{d:?}");
        }
    }
}
