//! A network lab for tests about bad links: a network namespace of the test's
//! own, joined to the host by a veth pair on a /30 of 10.213.0.0/16 that no
//! other lab on the machine holds, where a remote runs and the link to it can
//! be black-holed (iptables inside the namespace) and shaped (`tc tbf` on the
//! two veth ends). It touches nothing it did not create: no host interface,
//! no host firewall rule, no address outside its /30. Dropping it deletes
//! the veth pair (with its addresses, route and qdiscs) and the namespace
//! (with its firewall rules), also when the test panics.
//!
//! Needs root, iproute2 (`ip`, `tc`) and iptables. Under `CI=true` a lab
//! that cannot be built fails the test; elsewhere the test prints SKIP.

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};

use super::*;

/// The range the labs take their /30s from: private, and unlikely to be
/// routed on a real machine (checked before the first lab is built).
const RANGE: (u8, u8) = (10, 213);
/// /30 blocks in the range.
const BLOCKS: u32 = 1 << 14;

/// A namespace with a remote's end of a veth pair; see the module doc.
pub struct NetLab {
    /// The namespace, `er-<pid>-<n>`.
    pub ns: String,
    /// The veth end on the host, `er<block>h`: its address is `host_ip`.
    pub host_if: String,
    /// The veth end inside the namespace, `er<block>n`: `ns_ip`.
    pub ns_if: String,
    pub host_ip: Ipv4Addr,
    pub ns_ip: Ipv4Addr,
    blocked: Mutex<bool>,
}

/// Runs `cmd`; its output, or a message naming it.
fn run(cmd: &mut Command) -> Result<Output, String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(format!(
            "{cmd:?} exited with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn ip(args: &[&str]) -> Result<Output, String> {
    run(Command::new("ip").args(args))
}

/// Prerequisites of every lab, checked once per process: `None` when they
/// hold, else why not.
fn unavailable() -> Option<String> {
    static WHY: OnceLock<Option<String>> = OnceLock::new();
    WHY.get_or_init(|| {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Some("root (to create network namespaces)".into());
        }
        for program in ["ip", "tc", "iptables"] {
            if find_program(program).is_none() {
                return Some(format!("{program} (iproute2, iptables)"));
            }
        }
        // Routes of this machine inside the range, or covering it (other
        // than the default route), would be shadowed by a lab's /30.
        let range = format!("{}.{}.0.0/16", RANGE.0, RANGE.1);
        for how in ["root", "match"] {
            let out = match ip(&["-4", "-o", "route", "show", how, &range]) {
                Ok(out) => out,
                Err(e) => return Some(format!("a working `ip route` ({e})")),
            };
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            let foreign: Vec<&str> = text
                .lines()
                .filter(|l| !l.starts_with("default"))
                .filter(|l| !is_lab_route(l))
                .collect();
            if !foreign.is_empty() {
                panic!(
                    "this machine routes {range}, which the network lab uses: {foreign:?}; \
                     the link tests will not shadow it"
                );
            }
        }
        remove_stale_namespaces();
        None
    })
    .clone()
}

/// A route a lab made: on a host veth end `er<block>h`.
fn is_lab_route(route: &str) -> bool {
    route
        .split_whitespace()
        .skip_while(|w| *w != "dev")
        .nth(1)
        .is_some_and(|dev| {
            dev.strip_prefix("er")
                .and_then(|d| d.strip_suffix('h'))
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        })
}

/// Namespaces `er-<pid>-<n>` left by a test process that no longer runs
/// (killed before its labs were dropped): deleting one deletes its veth pair.
fn remove_stale_namespaces() {
    let Ok(out) = ip(&["netns", "list"]) else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let mut parts = name.split('-');
        let (Some("er"), Some(pid), Some(n), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let (Ok(pid), Ok(_)) = (pid.parse::<u32>(), n.parse::<u32>()) else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            eprintln!("netlab: removing namespace {name} left by process {pid}");
            let _ = ip(&["netns", "del", name]);
        }
    }
}

impl NetLab {
    /// Builds a lab; `None` after a SKIP line when this machine cannot
    /// (outside CI; under `CI=true` it panics saying what is missing).
    pub fn new() -> Option<NetLab> {
        if let Some(what) = unavailable() {
            return missing(&format!("the network lab's prerequisite {what}"));
        }
        static NEXT: AtomicU32 = AtomicU32::new(0);
        static TRIED: OnceLock<Mutex<HashSet<u32>>> = OnceLock::new();
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        let ns = format!("er-{pid}-{n}");
        if let Err(e) = ip(&["netns", "add", &ns]) {
            return missing(&format!("permission to create a network namespace ({e})"));
        }
        // The host end's name is the claim on a block: creating it fails
        // when another lab (in this or another process) holds the block.
        let start = (pid.wrapping_mul(2_654_435_761) >> 8) % BLOCKS;
        let mut tried = TRIED.get_or_init(Default::default).lock().unwrap();
        let mut claimed = None;
        let mut last_error = String::new();
        for i in 0..256 {
            let block = (start + n * 7 + i) % BLOCKS;
            if !tried.insert(block) {
                continue;
            }
            let (host_if, ns_if) = (format!("er{block}h"), format!("er{block}n"));
            match ip(&[
                "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if,
            ]) {
                Ok(_) => {
                    claimed = Some((block, host_if, ns_if));
                    break;
                }
                Err(e) if e.contains("exists") => last_error = e,
                Err(e) => {
                    let _ = ip(&["netns", "del", &ns]);
                    return missing(&format!("veth support ({e})"));
                }
            }
        }
        drop(tried);
        let Some((block, host_if, ns_if)) = claimed else {
            let _ = ip(&["netns", "del", &ns]);
            panic!("netlab: no free /30 block for a veth pair: {last_error}");
        };
        let base = u32::from(Ipv4Addr::new(RANGE.0, RANGE.1, 0, 0)) + block * 4;
        let lab = NetLab {
            ns,
            host_if,
            ns_if,
            host_ip: Ipv4Addr::from(base + 1),
            ns_ip: Ipv4Addr::from(base + 2),
            blocked: Mutex::new(false),
        };
        // From here on, Drop removes whatever was made.
        let (host_addr, ns_addr) = (format!("{}/30", lab.host_ip), format!("{}/30", lab.ns_ip));
        let steps: [&[&str]; 6] = [
            &["link", "set", &lab.ns_if, "netns", &lab.ns],
            &["addr", "add", &host_addr, "dev", &lab.host_if],
            &["link", "set", &lab.host_if, "up"],
            &["-n", &lab.ns, "addr", "add", &ns_addr, "dev", &lab.ns_if],
            &["-n", &lab.ns, "link", "set", &lab.ns_if, "up"],
            &["-n", &lab.ns, "link", "set", "lo", "up"],
        ];
        for step in steps {
            if let Err(e) = ip(step) {
                panic!("netlab {}: {e}", lab.ns);
            }
        }
        Some(lab)
    }

    /// `ip netns exec <ns>`: the prefix that runs a program in the namespace.
    pub fn prefix(&self) -> Vec<String> {
        ["ip", "netns", "exec", &self.ns].map(String::from).to_vec()
    }

    /// Runs `program args` in the namespace; panics if it fails.
    fn in_ns(&self, program: &str, args: &[&str]) {
        run(Command::new("ip")
            .args(["netns", "exec", &self.ns, program])
            .args(args))
        .unwrap_or_else(|e| panic!("netlab {}: {e}", self.ns));
    }

    /// Drops every packet between the host and the namespace (firewall
    /// rules inside the namespace, on its veth end only): a black hole, as
    /// a dead cellular link is. Connections see no reset, just silence.
    pub fn black_hole(&self) {
        let mut blocked = self.blocked.lock().unwrap();
        if !*blocked {
            self.in_ns(
                "iptables",
                &["-I", "INPUT", "-i", &self.ns_if, "-j", "DROP"],
            );
            self.in_ns(
                "iptables",
                &["-I", "OUTPUT", "-o", &self.ns_if, "-j", "DROP"],
            );
            *blocked = true;
        }
    }

    /// Lets packets through again.
    pub fn restore(&self) {
        let mut blocked = self.blocked.lock().unwrap();
        if *blocked {
            self.in_ns(
                "iptables",
                &["-D", "INPUT", "-i", &self.ns_if, "-j", "DROP"],
            );
            self.in_ns(
                "iptables",
                &["-D", "OUTPUT", "-o", &self.ns_if, "-j", "DROP"],
            );
            *blocked = false;
        }
    }

    /// Shapes both directions to `rate` (tc syntax, e.g. "256kbit") with a
    /// token bucket (`tbf`) on each veth end; `burst` (e.g. "16kb") is how
    /// much may pass at once.
    pub fn shape(&self, rate: &str, burst: &str) {
        let tbf = [
            "root", "tbf", "rate", rate, "burst", burst, "latency", "400ms",
        ];
        run(Command::new("tc")
            .args(["qdisc", "replace", "dev", &self.host_if])
            .args(tbf))
        .unwrap_or_else(|e| panic!("netlab {}: {e}", self.ns));
        let mut args = vec!["qdisc", "replace", "dev", &self.ns_if];
        args.extend(tbf);
        self.in_ns("tc", &args);
    }

    /// Removes the shaping.
    pub fn unshape(&self) {
        run(Command::new("tc").args(["qdisc", "del", "dev", &self.host_if, "root"]))
            .unwrap_or_else(|e| panic!("netlab {}: {e}", self.ns));
        self.in_ns("tc", &["qdisc", "del", "dev", &self.ns_if, "root"]);
    }

    /// IP bytes the host's end of the veth pair sent and received so far
    /// (its byte counters less 14 bytes of Ethernet header a packet): what a
    /// carrier counts, whether the namespace dropped the packets (a black
    /// hole) or not.
    pub fn wire_bytes(&self) -> u64 {
        let counter = |c: &str| -> u64 {
            let path = format!("/sys/class/net/{}/statistics/{c}", self.host_if);
            std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("{path}: {e}"))
                .trim()
                .parse()
                .unwrap_or_else(|e| panic!("{path}: {e}"))
        };
        let bytes = counter("tx_bytes") + counter("rx_bytes");
        let packets = counter("tx_packets") + counter("rx_packets");
        bytes - 14 * packets
    }

    /// `http://<ns_ip>:<port>`.
    pub fn url(&self, port: u16) -> String {
        format!("http://{}:{port}", self.ns_ip)
    }
}

impl Drop for NetLab {
    fn drop(&mut self) {
        // Deleting one end deletes the pair, its addresses, route and
        // qdiscs at once (a namespace's own deletion is asynchronous).
        let _ = ip(&["link", "del", &self.host_if]);
        if let Err(e) = ip(&["netns", "del", &self.ns]) {
            eprintln!("netlab: {e}");
        }
        let gone = !std::path::Path::new("/sys/class/net")
            .join(&self.host_if)
            .exists();
        if !gone && !std::thread::panicking() {
            panic!(
                "netlab {}: {} still exists after the lab was dropped",
                self.ns, self.host_if
            );
        }
    }
}
