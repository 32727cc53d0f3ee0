//! Hostile and careless clients against the write API: gzip bombs, huge
//! lines, bytes that are not UTF-8, clients that send slowly or not at all,
//! too many connections, and absurd requests. The agent must answer each with
//! a clear 4xx/5xx in bounded memory and time, and keep serving everyone else.

mod util;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use util::*;

fn sink_agent(launch: &Launch) -> (Sink, Agent) {
    let sink = Sink::accept_all();
    let config = AgentConfig::single(RemoteConfig::v2("sink", &sink.url()), "b", None);
    let agent = Agent::start_with(config, launch);
    (sink, agent)
}

/// Sends `head` (request line and headers, without the blank line) and
/// `body` on a fresh connection; returns the status and body of the answer,
/// or `None` when the server closed the connection without one.
fn raw_request(port: u16, head: &str, body: &[u8]) -> Option<(u16, String)> {
    raw_exchange(port, head, body).map(|(status, _, body)| (status, body))
}

/// As `raw_request`, with the answer's head (status line and headers) too.
fn raw_exchange(port: u16, head: &str, body: &[u8]) -> Option<(u16, String, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let _ = s.write_all(format!("{head}\r\n\r\n").as_bytes());
    let _ = s.write_all(body);
    read_full_answer(&mut s)
}

fn read_answer(s: &mut TcpStream) -> Option<(u16, String)> {
    read_full_answer(s).map(|(status, _, body)| (status, body))
}

fn read_full_answer(s: &mut TcpStream) -> Option<(u16, String, String)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 << 10];
    loop {
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                break;
            }
        }
    }
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.split(' ').nth(1)?.parse().ok()?;
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    Some((status, head.to_string(), body.to_string()))
}

// ---------------------------------------------------------------------------
// Bodies
// ---------------------------------------------------------------------------

/// `total` bytes of zeros as concatenated gzip members of 8 MiB each: about
/// a thousandth of that on the wire.
fn gzip_bomb(total: usize) -> Vec<u8> {
    let member = gzip(&vec![0u8; 8 << 20]);
    member.repeat(total / (8 << 20))
}

fn post_gzip(agent: &Agent, body: &[u8], chunked: bool) -> Reply {
    let http = http();
    let mut req = http
        .post(format!("{}/api/v2/write", agent.url()))
        .query("bucket", "b")
        .header("Content-Encoding", "gzip");
    req = req.header("Content-Type", "text/plain");
    let result = if chunked {
        req.send(ureq::SendBody::from_owned_reader(std::io::Cursor::new(
            body.to_vec(),
        )))
    } else {
        req.send(body)
    };
    let mut resp = result.expect("an HTTP answer");
    Reply {
        status: resp.status().as_u16(),
        body: resp.body_mut().read_to_string().unwrap_or_default(),
        headers: Default::default(),
    }
}

#[test]
fn gzip_bombs_are_refused_in_bounded_memory() {
    let (_sink, agent) = sink_agent(&Launch::new());
    let max_body = 32u64 << 20;
    // Warm up: a normal write, so the baseline holds the steady state.
    let normal = lines("bomb", 4, 20_000, ts_ago(Duration::from_secs(60)));
    assert_eq!(agent.write_v2("b", &normal, &Opts::new().gzip(true)).0, 204);
    let base = agent.peak_rss_kib();

    let bomb = gzip_bomb(1 << 30);
    eprintln!(
        "gzip bomb: {} KiB on the wire, 1 GiB inflated",
        bomb.len() >> 10
    );
    for chunked in [false, true] {
        let r = post_gzip(&agent, &bomb, chunked);
        assert_eq!(r.status, 413, "{}", r.body);
        assert!(r.body.contains("max_body_size"), "{}", r.body);
    }
    let one = agent.peak_rss_kib();
    eprintln!(
        "gzip bomb: agent peak RSS {} MiB before, {} MiB after one bomb at a time (max_body_size 32 MiB)",
        base >> 10,
        one >> 10
    );
    assert!(
        (one - base) << 10 < 2 * max_body,
        "one bomb raised the peak by {} MiB",
        (one - base) >> 10
    );

    // Eight at once.
    let threads: Vec<_> = (0..8)
        .map(|i| {
            let (bomb, url) = (bomb.clone(), agent.url());
            std::thread::spawn(move || {
                let r = http()
                    .post(format!("{url}/api/v2/write"))
                    .query("bucket", "b")
                    .header("Content-Encoding", "gzip")
                    .send(&bomb[..])
                    .map(|r| r.status().as_u16());
                (i, r)
            })
        })
        .collect();
    for t in threads {
        let (i, r) = t.join().unwrap();
        assert_eq!(r.as_ref().ok(), Some(&413), "bomb {i}: {r:?}");
    }
    let eight = agent.peak_rss_kib();
    eprintln!(
        "gzip bomb: agent peak RSS {} MiB after eight bombs at once",
        eight >> 10
    );
    // Two are inflated at a time, whatever the number sent.
    assert!(
        (eight - base) << 10 < 4 * max_body,
        "eight bombs raised the peak by {} MiB",
        (eight - base) >> 10
    );
    assert_eq!(agent.get("/health").status, 200);
    // Still takes writes.
    assert_eq!(agent.write_v2("b", &normal, &Opts::new().gzip(true)).0, 204);
}

/// Address space for the agent in the announcement test: its own mappings
/// (a queue map of 96 MiB, thread stacks, two malloc arenas) fit, a hundred
/// announced 32 MiB bodies (3.2 GB) do not.
const ANNOUNCED_AS_LIMIT: u64 = 1 << 30;

#[test]
fn announced_lengths_reserve_nothing() {
    // Regression: the body buffer was sized from Content-Length, so a
    // hundred clients announcing 32 MiB and sending 5 bytes made the agent
    // reserve 3.2 GB and abort where address space is short (32-bit ARM).
    let launch = Launch::new()
        .address_space_limit(ANNOUNCED_AS_LIMIT)
        .insert_after("[queue]", "map_size = \"96MiB\"");
    let sink = Sink::accept_all();
    let mut config = AgentConfig::single(RemoteConfig::v2("sink", &sink.url()), "b", None);
    config.replications[0].max_queue_size = "16MiB".into();
    let mut agent = Agent::start_with(config, &launch);
    let port = agent.port;
    let liars: Vec<TcpStream> = (0..100)
        .map(|_| {
            let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
            s.write_all(
                b"POST /api/v2/write?bucket=b HTTP/1.1\r\nHost: localhost\r\n\
                  Content-Length: 33554432\r\n\r\nlie f",
            )
            .unwrap();
            s
        })
        .collect();
    // Every one of them is being read before the honest write is sent.
    wait_until(DEADLINE, "the hundred announcements are being read", || {
        !agent.is_running()
            || metric_value(
                &agent.get("/metrics").body,
                "edge_replicator_write_requests_total",
                "",
            )
            .is_some_and(|n| n >= 100.0)
    });
    assert!(agent.is_running(), "agent died:\n{}", agent.log());
    let ts = ts_ago(Duration::from_secs(60));
    let (status, body) = agent.write_v2("b", lines("honest", 2, 50, ts), &Opts::new());
    assert_eq!(status, 204, "{body}");
    drop(liars);
    wait_eq(DEADLINE, "the honest lines delivered", 50, || {
        sink.lines_accepted().len()
    });
    assert!(agent.is_running(), "agent died:\n{}", agent.log());
    assert!(
        !agent.log().contains("memory allocation"),
        "{}",
        agent.log()
    );
}

#[test]
fn concurrent_large_writes_share_one_memory_budget() {
    // Regression: each body was bounded alone, so sixteen concurrent 30 MB
    // writes held 2.3 GB. With one budget for all of them, writes beyond it
    // wait and then get 503 + Retry-After; every 204 is queued.
    const BUDGET: u64 = 24 << 20;
    const WRITERS: usize = 24;
    const LINES: usize = 40_000; // about 5 MB of lines per body
                                 // Nothing listens at the remote: every acknowledged line stays queued,
                                 // where it is counted.
    let dead = format!("http://127.0.0.1:{}", free_port());
    let config = AgentConfig::single(RemoteConfig::v2("dead", &dead), "b", None);
    let launch = Launch::new().insert_after("[listen]", "max_request_memory = \"24MiB\"\n");
    let agent = Agent::start_with(config, &launch);
    let ts = ts_ago(Duration::from_secs(60));
    let warm = lines("warm", 8, 1000, ts);
    assert_eq!(agent.write_v2("b", &warm, &Opts::new()).0, 204);
    let base = agent.peak_rss_kib();

    let body = std::sync::Arc::new(lines("big", 8, LINES, ts));
    eprintln!("{WRITERS} writers of {} MiB each at once", body.len() >> 20);
    // Each writer sends 3 MiB of its body at once and the rest after HOLD:
    // the first few hold the whole budget for longer than a request may
    // wait for memory (5 s), so the others are refused however fast the
    // machine is, and the test does not depend on how long a write takes.
    const FIRST: usize = 3 << 20;
    const HOLD: Duration = Duration::from_secs(10);
    let port = agent.port;
    let writers: Vec<_> = (0..WRITERS)
        .map(|i| {
            let body = body.clone();
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
                let head = format!(
                    "POST /api/v2/write?bucket=b HTTP/1.1\r\nHost: localhost\r\n\
                     Content-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                s.write_all(head.as_bytes()).unwrap();
                s.write_all(&body.as_bytes()[..FIRST]).unwrap();
                std::thread::sleep(HOLD);
                s.write_all(&body.as_bytes()[FIRST..]).unwrap();
                let answer = read_full_answer(&mut s).map(|(status, head, text)| {
                    (
                        status,
                        head.to_ascii_lowercase().contains("retry-after:"),
                        text,
                    )
                });
                (i, answer.ok_or("no answer"))
            })
        })
        .collect();
    let (mut taken, mut refused) = (0u64, 0u64);
    for w in writers {
        let (i, r) = w.join().unwrap();
        let (status, retry, text) = r.unwrap_or_else(|e| panic!("writer {i}: {e}"));
        match status {
            204 => taken += 1,
            503 => {
                assert!(retry, "writer {i}: 503 without Retry-After: {text}");
                assert!(text.contains("max_request_memory"), "writer {i}: {text}");
                refused += 1;
            }
            _ => panic!("writer {i}: {status} {text}"),
        }
    }
    let peak = agent.peak_rss_kib();
    eprintln!(
        "memory budget 24 MiB: {taken} writes taken, {refused} refused with 503; \
         agent peak RSS {} MiB before, {} MiB after",
        base >> 10,
        peak >> 10
    );
    assert!(refused > 0, "the budget never filled");
    assert!(taken > 0, "nothing was taken");
    // Every 204 is queued, whole; nothing of a 503 is.
    let rep = agent.replication("r1");
    assert_eq!(
        field(&rep, "acceptedLines"),
        1000 + taken * LINES as u64,
        "{rep:#}"
    );
    assert_conserved(&rep);
    assert_eq!(
        metric_value(
            &agent.metrics(),
            "edge_replicator_write_refused_memory_total",
            ""
        ),
        Some(refused as f64)
    );
    // Without the budget these bodies and their normalised lines alone
    // came to 24 x 10 MB; with it, the limit plus one request's share.
    assert!(
        (peak - base) << 10 < 2 * BUDGET + (32 << 20),
        "peak RSS grew by {} MiB",
        (peak - base) >> 10
    );
}

#[test]
fn huge_lines_are_taken_whole_or_refused_clearly() {
    let sink = Sink::accept_all();
    let mut remote = RemoteConfig::v2("sink", &sink.url());
    // A batch of one 20 MB line takes a while to post (seconds under an
    // emulator); the harness's short request timeout would cut it off.
    remote.timeout = "120s".into();
    let agent = Agent::start_with(AgentConfig::single(remote, "b", None), &Launch::new());
    let ts = ts_ago(Duration::from_secs(60));
    // One 20 MB line (a 32 MiB body is allowed): taken, and sent alone.
    let huge = format!("huge,k=v s=\"{}\" {ts}\n", "x".repeat(20_000_000));
    let started = Instant::now();
    let (status, text) = agent.write_v2("b", &huge, &Opts::new());
    assert_eq!(status, 204, "{text}");
    eprintln!(
        "a 20 MB line validated and queued in {:?}",
        started.elapsed()
    );
    let small = lines("small", 2, 10, ts);
    assert_eq!(agent.write_v2("b", &small, &Opts::new()).0, 204);
    wait_eq(DEADLINE, "delivered", 11, || {
        field(&agent.replication("r1"), "deliveredLines")
    });
    let sent = sink.lines_accepted();
    assert!(
        sent.iter().any(|l| l.len() + 1 == huge.len()
            && huge.starts_with(std::str::from_utf8(&l[..30]).unwrap())),
        "the huge line arrived whole"
    );

    // Past max_body_size: refused, with the limit named.
    let too_big = format!("huge,k=v s=\"{}\" {ts}\n", "y".repeat(40_000_000));
    let (status, text) = agent.write_v2("b", &too_big, &Opts::new());
    assert_eq!(status, 413, "{text}");
    assert!(text.contains("max_body_size"), "{text}");

    // A 30 MB line that is not line protocol: a short, clear 400.
    let junk = "z".repeat(30_000_000);
    let (status, text) = agent.write_v2("b", &junk, &Opts::new());
    assert_eq!(status, 400);
    assert!(text.len() < 1000, "the error quotes {} bytes", text.len());
    assert!(text.contains("line 1"), "{text}");

    // A line of many thousands of tags and fields.
    let mut wide = String::from("wide");
    for i in 0..50_000 {
        wide += &format!(",t{i:05}=v");
    }
    wide += " ";
    wide += &(0..50_000)
        .map(|i| format!("f{i:05}={i}i"))
        .collect::<Vec<_>>()
        .join(",");
    wide += &format!(" {ts}\n");
    let started = Instant::now();
    let (status, text) = agent.write_v2("b", &wide, &Opts::new());
    assert_eq!(status, 204, "{text}");
    eprintln!(
        "a line of 50,000 tags and 50,000 fields validated and queued in {:?}",
        started.elapsed()
    );
    // And the same tags sorted backwards, with one duplicate at the end.
    let mut dup = String::from("wide");
    for i in (0..50_000).rev() {
        dup += &format!(",t{i:05}=v");
    }
    dup += &format!(",t00000=w f=1 {ts}\n");
    let (status, text) = agent.write_v2("b", &dup, &Opts::new());
    assert_eq!(status, 400);
    assert!(text.contains("duplicate tag key"), "{text}");
    assert_eq!(agent.get("/health").status, 200);
}

/// InfluxDB requires line protocol to be UTF-8 (InfluxDB 3 and Cloud parse
/// it as text; 1.x and 2.x drop keys with invalid unicode), so a line that
/// is not is refused here, with its number, instead of at the remote.
#[test]
fn lines_that_are_not_utf8_are_refused_by_number() {
    let (sink, agent) = sink_agent(&Launch::new());
    let ts = ts_ago(Duration::from_secs(60));
    let mut body = Vec::new();
    body.extend_from_slice(format!("ok,k=a f=1 {ts}\n").as_bytes());
    body.extend_from_slice(b"bad,k=\xff\xfe f=1 ");
    body.extend_from_slice(format!("{ts}\n").as_bytes());
    body.extend_from_slice(format!("ok,k=b f=2 {ts}\n").as_bytes());
    body.extend_from_slice(b"bad,k=c s=\"caf\xc3\" ");
    body.extend_from_slice(format!("{ts}\n").as_bytes());
    body.extend_from_slice(format!("ok,k=c f=3,s=\"caf\u{e9} \u{1f600}\" {ts}\n").as_bytes());
    for api in ["v2", "v1"] {
        let r = if api == "v2" {
            agent.write_v2_reply("b", &body, &Opts::new())
        } else {
            agent.write_v1_reply("b", None, &body, &Opts::new())
        };
        assert_eq!(r.status, 400, "{api}: {}", r.body);
        let msg = r.json();
        let msg = msg["message"]
            .as_str()
            .or(msg["error"].as_str())
            .unwrap()
            .to_string();
        assert!(msg.starts_with("2 of 5 lines invalid"), "{api}: {msg}");
        assert!(
            msg.contains("line 2: invalid UTF-8") && msg.contains("line 4: invalid UTF-8"),
            "{api}: {msg}"
        );
    }
    wait_eq(DEADLINE, "valid lines delivered", 6, || {
        field(&agent.replication("r1"), "deliveredLines")
    });
    for line in sink.lines_accepted() {
        assert!(std::str::from_utf8(&line).is_ok(), "{line:?}");
    }
}

// ---------------------------------------------------------------------------
// Connections
// ---------------------------------------------------------------------------

fn timeouts(header: &str, body: &str) -> Launch {
    Launch::new().insert_after(
        "[listen]",
        &format!("header_timeout = \"{header}\"\nbody_timeout = \"{body}\"\n"),
    )
}

/// Waits until the server closes `s` (or answers); returns how long after
/// `started` that was.
fn closed_after(s: &mut TcpStream, started: Instant, limit: Duration) -> Duration {
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return started.elapsed(),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return started.elapsed(),
        }
        assert!(
            started.elapsed() < limit,
            "connection still open after {limit:?}"
        );
    }
}

#[test]
fn slow_and_silent_clients_are_cut_off_while_others_are_served() {
    let (_sink, agent) = sink_agent(&timeouts("1s", "2s"));
    let ts = ts_ago(Duration::from_secs(60));
    let port = agent.port;

    let opened = Instant::now();
    // Connects and says nothing.
    let mut silent = TcpStream::connect(("127.0.0.1", port)).unwrap();
    // Sends its headers a byte at a time, never finishing.
    let mut trickle = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let trickler = {
        let mut t = trickle.try_clone().unwrap();
        std::thread::spawn(move || {
            for b in b"POST /api/v2/write?bucket=b HTTP/1.1\r\nHost: localhost\r\nX-Slow: "
                .iter()
                .chain(std::iter::repeat(&b'a'))
                .take(200)
            {
                if t.write_all(&[*b]).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    // Sends headers, then its body slowly.
    let mut slow_body = TcpStream::connect(("127.0.0.1", port)).unwrap();
    slow_body
        .write_all(
            b"POST /api/v2/write?bucket=b HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100000\r\n\r\n",
        )
        .unwrap();
    let dribbler = {
        let mut t = slow_body.try_clone().unwrap();
        let line = format!("slow f=1 {ts}\n");
        std::thread::spawn(move || {
            for _ in 0..100 {
                if t.write_all(line.as_bytes()).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };

    // Everyone else is served meanwhile, at once.
    for i in 0..5 {
        let started = Instant::now();
        let body = lines("fast", 2, 100, ts + i);
        assert_eq!(agent.write_v2("b", &body, &Opts::new()).0, 204);
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    let t_silent = closed_after(&mut silent, opened, Duration::from_secs(10));
    let t_trickle = closed_after(&mut trickle, opened, Duration::from_secs(10));
    slow_body
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let answer = read_answer(&mut slow_body);
    eprintln!(
        "silent client cut off after {t_silent:?}, header trickle after {t_trickle:?}, slow body answered {answer:?}"
    );
    let (status, body) = answer.expect("the slow body gets an answer");
    assert_eq!(status, 408, "{body}");
    assert!(body.contains("too slowly"), "{body}");
    trickler.join().unwrap();
    dribbler.join().unwrap();
    assert_eq!(agent.get("/health").status, 200);
}

/// Open descriptors of process `pid`.
fn open_descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[test]
fn idle_floods_cannot_keep_an_authorised_writer_out() {
    // Regression: 600 idle connections took every slot, so each write got
    // 503 for as long as they reconnected, and the agent accepted (and held
    // a descriptor for) every connection past the cap until, at 3,000, it
    // ran out of descriptors and shipping failed too.
    let sink = Sink::accept_all();
    let mut config = AgentConfig::single(RemoteConfig::v2("sink", &sink.url()), "b", None);
    config.tokens = vec!["w-token".into()];
    // Idle connections would stay for the header timeout: long, so they
    // pile up; 1024 descriptors, a distribution's usual soft limit.
    let launch = timeouts("60s", "60s").open_files_limit(1024);
    let agent = Agent::start_with(config, &launch);
    let port = agent.port;

    // A flood that keeps 1,500 idle connections open (more than the cap
    // and the listen backlog together hold), closing the oldest to open a
    // new one, for as long as the test runs.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let opened = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let flood = {
        let (stop, opened) = (stop.clone(), opened.clone());
        std::thread::spawn(move || {
            let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
            let mut open = std::collections::VecDeque::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
                    open.push_back(s);
                    opened.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                if open.len() > 1500 {
                    open.pop_front();
                }
            }
        })
    };
    wait_until(DEADLINE, "the flood holds 1,500 connections", || {
        opened.load(std::sync::atomic::Ordering::Relaxed) >= 1500
    });

    let ts = ts_ago(Duration::from_secs(60));
    let mut slowest = Duration::ZERO;
    let mut most_descriptors = 0;
    const WRITES: usize = 20;
    for i in 0..WRITES {
        let started = Instant::now();
        let answer = raw_http(
            port,
            "POST /api/v2/write?bucket=b HTTP/1.1\r\nHost: localhost\r\nAuthorization: Token w-token\r\n",
            lines(&format!("w{i}"), 1, 10, ts).as_bytes(),
        );
        slowest = slowest.max(started.elapsed());
        assert_eq!(
            raw_status(&answer),
            204,
            "write {i} during the flood: {answer}"
        );
        most_descriptors = most_descriptors.max(open_descriptors(agent.pid()));
    }
    // Shipping keeps its descriptors: everything arrives while the flood
    // goes on.
    wait_eq(
        DEADLINE,
        "lines delivered during the flood",
        WRITES * 10,
        || sink.lines_accepted().len(),
    );
    let flooded = opened.load(std::sync::atomic::Ordering::Relaxed);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    flood.join().unwrap();
    eprintln!(
        "flood of {flooded} idle connections: {WRITES} authorised writes all 204, slowest {slowest:?}; \
         agent descriptors at most {most_descriptors}, RSS {} MiB",
        agent.rss_kib() >> 10
    );
    // Past the cap the agent stops accepting: its descriptors stay near
    // the cap (512) plus what the queue and shipping use.
    assert!(
        most_descriptors <= 512 + 64,
        "{most_descriptors} descriptors open"
    );
    let log = agent.log();
    assert!(!log.contains("Too many open files"), "{log}");
    assert!(!log.contains("accept failed"), "{log}");
}

// ---------------------------------------------------------------------------
// Absurd requests
// ---------------------------------------------------------------------------

#[test]
fn absurd_requests_get_short_clear_answers() {
    let (_sink, agent) = sink_agent(&Launch::new());
    let port = agent.port;
    let long = "q".repeat(100_000);
    let line = format!("m f=1 {}\n", ts_ago(Duration::from_secs(60)));
    let cases: Vec<(String, String, &[u16])> = vec![
        (
            format!("POST /api/v2/write?bucket={long} HTTP/1.1"),
            "long bucket".into(),
            &[404, 414, 431],
        ),
        (
            format!("POST /write?db={} HTTP/1.1", "d".repeat(5000)),
            "5 kB database, echoed in a header too".into(),
            &[404],
        ),
        (
            format!("POST /api/v2/write?bucket=b&precision={long} HTTP/1.1"),
            "long precision".into(),
            &[400, 414, 431],
        ),
        (
            "POST /api/v2/write?bucket=b&precision=fs HTTP/1.1".into(),
            "unknown precision".into(),
            &[400],
        ),
        (
            "POST /write?db=%ZZ%00%0A HTTP/1.1".into(),
            "bad escapes".into(),
            &[404],
        ),
        (
            "POST /write?db=a%0D%0AX-Injected:%20yes HTTP/1.1".into(),
            "header injection".into(),
            &[404],
        ),
        (
            format!(
                "POST /api/v2/write?{} HTTP/1.1",
                (0..5000)
                    .map(|i| format!("bucket=b{i}"))
                    .collect::<Vec<_>>()
                    .join("&")
            ),
            "repeated parameters".into(),
            &[404],
        ),
        (
            "POST /api/v2/write HTTP/1.1".into(),
            "no bucket".into(),
            &[400],
        ),
        (
            "POST /api/v2/write?bucket= HTTP/1.1".into(),
            "empty bucket".into(),
            &[400],
        ),
        (
            "POST /api/v2/write?bucket=b&org=o&org=p&precision=ns&precision=s HTTP/1.1".into(),
            "repeated precision".into(),
            &[204],
        ),
        (
            "FROB /api/v2/write?bucket=b HTTP/1.1".into(),
            "unknown method".into(),
            &[405],
        ),
        (
            format!("GET /{long} HTTP/1.1"),
            "long path".into(),
            &[404, 414, 431],
        ),
        (
            "POST /api/v2/write?bucket=b HTTP/1.1\r\nContent-Encoding: br".into(),
            "unknown encoding".into(),
            &[415],
        ),
        (
            "POST /api/v2/write?bucket=b HTTP/1.1\r\nContent-Encoding: gzip".into(),
            "gzip header, plain body".into(),
            &[400],
        ),
        (
            format!("POST /api/v2/write?bucket=b HTTP/1.1\r\nX-Big: {long}"),
            "huge header".into(),
            &[204, 431],
        ),
        (
            format!(
                "POST /api/v2/write?bucket=b HTTP/1.1\r\n{}",
                (0..2000)
                    .map(|i| format!("X-H{i}: v"))
                    .collect::<Vec<_>>()
                    .join("\r\n")
            ),
            "many headers".into(),
            &[204, 431],
        ),
    ];
    for (head, what, expected) in &cases {
        let head = format!(
            "{head}\r\nHost: localhost\r\nContent-Length: {}\r\nConnection: close",
            line.len()
        );
        let answer = raw_exchange(port, &head, line.as_bytes());
        let (status, answer_head, body) = answer.unwrap_or((0, String::new(), String::new()));
        eprintln!("{what}: {status} {:.120}", body);
        assert!(
            expected.contains(&status),
            "{what}: expected one of {expected:?}, got {status}: {:.300}",
            body
        );
        assert!(
            body.len() < 2000,
            "{what}: a {} byte answer: {:.300}",
            body.len(),
            body
        );
        assert!(
            !answer_head.to_ascii_lowercase().contains("\r\nx-injected"),
            "{what}: {answer_head}"
        );
        if !body.is_empty() {
            let json: serde_json::Value = serde_json::from_str(&body)
                .unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {body}"));
            assert!(json.is_object(), "{what}: {body}");
        }
    }
    // A body announced larger than the limit is refused before it is sent
    // (no body follows: an agent that waited for it would not answer 413).
    let answer = raw_request(
        port,
        "POST /api/v2/write?bucket=b HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1000000000000",
        b"",
    );
    assert_eq!(answer.map(|a| a.0), Some(413));
    // Nonsense Content-Length values.
    for cl in ["-1", "abc", "99999999999999999999999"] {
        let answer = raw_request(
            port,
            &format!(
                "POST /api/v2/write?bucket=b HTTP/1.1\r\nHost: localhost\r\nContent-Length: {cl}"
            ),
            b"",
        );
        assert!(
            matches!(answer, Some((400, _)) | None),
            "Content-Length {cl}: {answer:?}"
        );
    }
    let log = agent.log();
    assert!(!log.contains("panicked"), "{log}");
    assert_eq!(agent.get("/health").status, 200);
}

/// A client that hangs up while its write waits for its commit: the lines
/// are queued all the same (the commit was under way), and the write
/// counters say so instead of missing them.
#[test]
fn a_write_whose_client_hung_up_before_its_commit_is_counted() {
    let dead = closed_port();
    let mut config = AgentConfig::single(RemoteConfig::v2("dead", &dead.url()), "b", None);
    // A commit that waits a second for company: the client is gone by then.
    config.commit_interval = "1s".into();
    let mut agent = Agent::start(config);
    agent.keep(dead);
    let body = lines("hungup", 3, 30, ts_ago(Duration::from_secs(60)));
    let mut s = TcpStream::connect(("127.0.0.1", agent.port)).unwrap();
    let head = format!(
        "POST /api/v2/write?bucket=b HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body.as_bytes()).unwrap();
    // The body was read and its lines handed to the queue writer once the
    // bytes are counted (nothing waits between the two); hang up then,
    // while the commit is still most of a second away.
    wait_until(DEADLINE, "the body counted as received", || {
        metric_value(&agent.metrics(), "edge_replicator_write_bytes_total", "") > Some(0.0)
    });
    drop(s);
    wait_eq(DEADLINE, "r1 remainingLines", 30, || {
        field(&agent.replication("r1"), "remainingLines")
    });
    wait_eq(
        DEADLINE,
        "edge_replicator_write_lines_total",
        Some(30.0),
        || metric_value(&agent.metrics(), "edge_replicator_write_lines_total", ""),
    );
}
