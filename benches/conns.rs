//! `cargo bench --bench conns`: `prestop drain --wait-conns` against what users run instead,
//! side by side in one run: a loop that asks `ss` every 500 ms (what seatgeek's script does
//! with `netstat`) and one that polls every second (as Envoy Gateway's and Contour's shutdown
//! managers poll Envoy). Each runs as a whole process; CPU time is `wait4`'s (the hook and every
//! `ss` it ran), peak RSS the hook's own `VmHWM`.
//!
//! Figures: the time from the last in-flight connection closing to the hook's exit; the CPU a
//! minute of waiting costs with 100 and with 10,000 idle keep-alive connections open on the
//! port (and one in flight, so nobody stops waiting); peak RSS. `-- --quick` (or
//! `PRESTOP_BENCH_QUICK=1`) runs fewer, shorter rounds, for CI. The benchmark fails only if a
//! hook misbehaves, never because of a number.

#[allow(dead_code)]
mod support;

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, ExitCode};
use std::thread;
use std::time::{Duration, Instant};

use support::{Binary, Bytes, Hook, Rng, Summary, Time};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Who {
    Prestop,
    Ss500,
    Poll1s,
}

const EVERYONE: [Who; 3] = [Who::Prestop, Who::Ss500, Who::Poll1s];

impl Who {
    fn heading(self) -> &'static str {
        match self {
            Who::Prestop => "prestop",
            Who::Ss500 => "`ss` loop, 500 ms",
            Who::Poll1s => "polling loop, 1 s",
        }
    }

    fn period(self) -> Duration {
        match self {
            Who::Ss500 => Duration::from_millis(500),
            _ => Duration::from_secs(1),
        }
    }

    /// A hook waiting for the connections to `port`, printing a line once it watches.
    fn hook(self, bin: &Binary, dir: &Path, port: u16, budget: Duration) -> Command {
        match self {
            Who::Prestop => {
                let mut cmd = Command::new(&bin.path);
                cmd.current_dir(dir)
                    .args(["drain", "--wait-conns", &port.to_string(), "--grace-period"])
                    .arg(format!(
                        "{}ms",
                        (budget + Duration::from_secs(1)).as_millis()
                    ))
                    .args(["--reserve", "1s", "--log-target", "stderr", "--state-dir"])
                    .arg(dir.join("state"));
                cmd
            }
            Who::Ss500 | Who::Poll1s => {
                let mut cmd = Command::new("bash");
                cmd.current_dir(dir).arg("-c").arg(format!(
                    "echo 'waiting for conns' >&2\n\
                     while [ -n \"$(ss -Htn state established '( sport = :{port} )')\" ]; do \
                     sleep {}; done\necho drained >&2",
                    self.period().as_secs_f64()
                ));
                cmd
            }
        }
    }
}

/// Connections to one listening port: `idle` keep-alive ones (a request answered, then
/// quiet) and `busy` ones (accepted, nothing exchanged yet: in flight). The idle ones' client
/// ends live in a process of their own (this binary, run again), so that 10,000 pairs do not
/// need 20,000 descriptors in one process.
struct Farm {
    port: u16,
    idle: Vec<TcpStream>,
    clients: Option<std::process::Child>,
    busy: Vec<(TcpStream, TcpStream)>,
    _listener: TcpListener,
}

/// Set in the environment of the process that holds a farm's client ends: `PORT COUNT`.
const CLIENTS: &str = "PRESTOP_BENCH_FARM_CLIENTS";

impl Farm {
    fn new(idle: usize, busy: usize) -> Result<Farm, String> {
        let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
        let port = listener.local_addr().map_err(|e| e.to_string())?.port();
        let mut clients = Command::new(std::env::current_exe().map_err(|e| e.to_string())?)
            .env(CLIENTS, format!("{port} {idle}"))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start the client process: {e}"))?;
        let mut farm = Farm {
            port,
            idle: Vec::with_capacity(idle),
            clients: None,
            busy: Vec::with_capacity(busy),
            _listener: listener.try_clone().map_err(|e| e.to_string())?,
        };
        for _ in 0..idle {
            let (mut server, _) = listener.accept().map_err(|e| format!("accept: {e}"))?;
            let mut byte = [0u8; 1];
            server.read_exact(&mut byte).map_err(|e| e.to_string())?;
            server.write_all(b"!").map_err(|e| e.to_string())?;
            farm.idle.push(server);
        }
        let mut ready = [0u8; 6];
        clients
            .stdout
            .take()
            .ok_or("no pipe")?
            .read_exact(&mut ready)
            .map_err(|e| format!("the client process failed: {e}"))?;
        farm.clients = Some(clients);
        for _ in 0..busy {
            let client = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
            let (server, _) = listener.accept().map_err(|e| e.to_string())?;
            farm.busy.push((client, server));
        }
        Ok(farm)
    }
}

impl Drop for Farm {
    fn drop(&mut self) {
        if let Some(mut clients) = self.clients.take() {
            drop(clients.stdin.take());
            let _ = clients.wait();
        }
    }
}

/// The client ends of a farm: connects, asks, reads the answer, says `ready`, and holds the
/// connections until its stdin closes.
fn hold_clients(spec: &str) -> ExitCode {
    let mut words = spec.split_whitespace();
    let (Some(Ok(port)), Some(Ok(count))) = (
        words.next().map(str::parse::<u16>),
        words.next().map(str::parse::<usize>),
    ) else {
        return ExitCode::FAILURE;
    };
    raise_fd_limit();
    let mut held = Vec::with_capacity(count);
    for _ in 0..count {
        let Ok(mut conn) = TcpStream::connect(("127.0.0.1", port)) else {
            return ExitCode::FAILURE;
        };
        let mut byte = [0u8; 1];
        if conn
            .write_all(b"?")
            .and_then(|()| conn.read_exact(&mut byte))
            .is_err()
        {
            return ExitCode::FAILURE;
        }
        held.push(conn);
    }
    let _ = std::io::stdout().write_all(b"ready\n");
    let _ = std::io::stdout().flush();
    let _ = std::io::stdin().read(&mut [0u8; 1]);
    ExitCode::SUCCESS
}

/// Raises the open-file limit to what 10,000 connection pairs need, where the hard limit
/// allows.
fn raise_fd_limit() {
    let mut limit = nix::libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write only the struct passed.
    unsafe {
        if nix::libc::getrlimit(nix::libc::RLIMIT_NOFILE, &raw mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max.min(65_536);
            nix::libc::setrlimit(nix::libc::RLIMIT_NOFILE, &raw const limit);
        }
    }
}

/// The last in-flight connection closes (three do, the last timed) → the hook exits.
fn close_to_exit(bin: &Binary, who: Who, pause: Duration) -> Result<(Duration, u64), String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let mut farm = Farm::new(0, 3)?;
    drop(farm.clients.take());
    let mut hook = Hook::spawn(who.hook(bin, dir.path(), farm.port, Duration::from_secs(30)))?;
    hook.sample_rss();
    hook.wait_for_line("waiting for conns")?;
    thread::sleep(pause);
    let mut closed = Instant::now();
    for pair in farm.busy.drain(..) {
        closed = Instant::now();
        drop(pair);
    }
    let exit = hook.expect_exit(0)?;
    Ok((
        exit.at.saturating_duration_since(closed),
        exit.peak_rss_kib.unwrap_or(0),
    ))
}

/// Every hook waits `span` on one port with `idle` idle connections and one in flight, all at
/// once (CPU time does not depend on what else runs; but every dump walks the whole
/// connection table, so the sizes are measured one after the other). Each hook's CPU per
/// minute and peak RSS.
fn waiting(bin: &Binary, idle: usize, span: Duration) -> Result<Vec<(Who, Cost)>, String> {
    let farm = Farm::new(idle, 1)?;
    let mut hooks = Vec::new();
    for who in EVERYONE {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let budget = span + Duration::from_secs(60);
        let mut hook = Hook::spawn(who.hook(bin, dir.path(), farm.port, budget))?;
        hook.sample_rss();
        hooks.push((who, hook, dir));
    }
    let mut started = Vec::new();
    for (_, hook, _) in &mut hooks {
        let at = hook.wait_for_line("waiting for conns")?;
        // What starting and the first look cost is set apart: the figure is waiting's.
        started.push((at, hook.cpu_so_far().unwrap_or_default()));
    }
    thread::sleep(span);
    let mut results = Vec::new();
    for ((who, mut hook, _dir), (ready_at, ready_cpu)) in hooks.into_iter().zip(started) {
        hook.kill_group();
        let result = hook.wait().map(|exit| {
            let waited = exit.at.saturating_duration_since(ready_at).as_secs_f64();
            let minute = exit.cpu.saturating_sub(ready_cpu).mul_f64(60.0 / waited);
            (minute, ready_cpu, exit.peak_rss_kib.unwrap_or(0))
        });
        results.push((who, result));
    }
    drop(farm);
    Ok(results)
}

/// Moves the benchmark into a network namespace of its own, as a pod has: its TCP counters
/// then count only its own connections. (The kernel's connection table stays the node's,
/// as in a pod: every dump still walks the sockets of every namespace.) Needs root.
fn private_network() -> Result<(), String> {
    if !nix::unistd::geteuid().is_root() {
        return Err("not root".into());
    }
    // SAFETY: unshare takes a flags word; called before any thread of ours starts.
    if unsafe { nix::libc::unshare(nix::libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error().to_string());
    }
    let up = Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status()
        .map_err(|e| format!("ip: {e}"))?;
    if !up.success() {
        return Err(format!("ip link set lo up: {up}"));
    }
    Ok(())
}

/// What one waiting hook cost: CPU per minute of waiting, CPU of its start and first look,
/// and peak RSS in KiB.
type Figures = (Duration, Duration, u64);
type Cost = Result<Figures, String>;

fn p99(samples: &[Duration]) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    sorted[(sorted.len() * 99).div_ceil(100).saturating_sub(1)]
}

/// Close → exit, for each hook: prestop one run at a time; the loops, slow by design, with
/// their runs spread evenly over their period, the two loops at once.
fn detection(bin: &Binary, runs_prestop: usize, runs_peer: usize) -> Vec<(Who, Vec<Duration>)> {
    let mut rng = Rng::new(7);
    let mut latencies = Vec::new();
    for _ in 0..runs_prestop {
        let pause = rng.between(Duration::from_millis(50), Duration::from_millis(150));
        match close_to_exit(bin, Who::Prestop, pause) {
            Ok((latency, _)) => latencies.push(latency),
            Err(e) => eprintln!("error: prestop close→exit: {e}"),
        }
    }
    let mut found = vec![(Who::Prestop, latencies)];
    let peers: Vec<(Who, Vec<Duration>)> = thread::scope(|s| {
        let handles: Vec<_> = [Who::Ss500, Who::Poll1s]
            .into_iter()
            .map(|who| {
                s.spawn(move || {
                    let mut latencies = Vec::new();
                    for i in 0..runs_peer {
                        let phase = who.period().mul_f64((i as f64 + 0.5) / runs_peer as f64);
                        match close_to_exit(bin, who, Duration::from_millis(200) + phase) {
                            Ok((latency, _)) => latencies.push(latency),
                            Err(e) => eprintln!("error: {} close→exit: {e}", who.heading()),
                        }
                    }
                    (who, latencies)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    found.extend(peers);
    found
}

/// The markdown table of every figure.
fn render(detect: &[(Who, Vec<Duration>)], cpu: &[(Who, usize, Cost)], sizes: &[usize]) -> String {
    let mut table = String::new();
    let _ = writeln!(
        table,
        "| median / p99 (runs) | {} |\n| --- | --- | --- | --- |",
        EVERYONE.map(Who::heading).join(" | ")
    );
    let mut row = String::from("| last in-flight connection closed → hook exited |");
    for (_, latencies) in detect {
        match Summary::of(latencies) {
            Some(s) => {
                let _ = write!(
                    row,
                    " {} / {} ({}) |",
                    Time(s.median),
                    Time(p99(latencies)),
                    s.runs
                );
            }
            None => row.push_str(" — failed |"),
        }
    }
    let _ = writeln!(table, "{row}");
    let cost = |who: Who, idle: usize| {
        cpu.iter()
            .find(|(w, n, _)| *w == who && *n == idle)
            .and_then(|(_, _, r)| r.as_ref().ok())
            .copied()
    };
    // One row per size for each figure a cost holds; "—" where it has none.
    let rows = |table: &mut String, label: &str, cell: &dyn Fn(&Figures) -> Option<String>| {
        for &idle in sizes {
            let mut row = format!("| {label}, {idle} idle connections |");
            for who in EVERYONE {
                match cost(who, idle) {
                    Some(figures) => match cell(&figures) {
                        Some(text) => {
                            let _ = write!(row, " {text} |");
                        }
                        None => row.push_str(" — |"),
                    },
                    None => row.push_str(" — failed |"),
                }
            }
            let _ = writeln!(table, "{row}");
        }
    };
    rows(&mut table, "CPU per minute of waiting", &|&(
        minute,
        _,
        _,
    )| {
        Some(Time(minute).to_string())
    });
    rows(&mut table, "start-up and first look", &|&(_, first, _)| {
        Some(Time(first).to_string())
    });
    rows(&mut table, "peak RSS", &|&(_, _, kib)| {
        (kib > 0).then(|| Bytes(kib * 1024).to_string())
    });
    table
}

/// prestop's goals, reported, never failed on.
fn goals(detect: &[(Who, Vec<Duration>)], cpu: &[(Who, usize, Cost)]) {
    let met = |ok: bool| if ok { "met" } else { "missed" };
    if let Some((_, latencies)) = detect
        .iter()
        .find(|(w, l)| *w == Who::Prestop && !l.is_empty())
    {
        let median = Summary::of(latencies).map(|s| s.median).unwrap_or_default();
        let p99 = p99(latencies);
        println!(
            "goal: close → exit median ≤ 20 ms: {} ({}); p99 ≤ 50 ms: {} ({})",
            met(median <= Duration::from_millis(20)),
            Time(median),
            met(p99 <= Duration::from_millis(50)),
            Time(p99),
        );
    }
    for (idle, goal) in [(100usize, 20u64), (10_000, 200)] {
        if let Some((_, _, Ok((minute, _, kib)))) = cpu
            .iter()
            .find(|(w, n, _)| *w == Who::Prestop && *n == idle)
        {
            println!(
                "goal: CPU a minute with {idle} idle ≤ {goal} ms: {} ({}); peak RSS ≤ 4 MiB: {} ({})",
                met(*minute <= Duration::from_millis(goal)),
                Time(*minute),
                met(*kib <= 4096),
                Bytes(kib * 1024),
            );
        }
    }
}

fn main() -> ExitCode {
    if let Ok(spec) = std::env::var(CLIENTS) {
        return hold_clients(&spec);
    }
    let quick = std::env::args().any(|a| a == "--quick")
        || std::env::var_os("PRESTOP_BENCH_QUICK").is_some_and(|v| v != "0");
    match private_network() {
        Ok(()) => eprintln!("measuring in a network namespace of its own, as a pod's"),
        Err(why) => eprintln!("measuring in this machine's network namespace ({why})"),
    }
    raise_fd_limit();
    let bin = match support::build() {
        Ok(bin) => bin,
        Err(e) => {
            eprintln!("conns bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (runs_prestop, runs_peer, span) = if quick {
        (31, 3, Duration::from_secs(15))
    } else {
        (201, 9, Duration::from_secs(60))
    };
    let detect = detection(&bin, runs_prestop, runs_peer);
    // A minute of waiting (15 s in a quick run), with 100 and with 10,000 idle connections.
    let sizes = [100usize, 10_000];
    let mut cpu: Vec<(Who, usize, Cost)> = Vec::new();
    let mut failed = false;
    for idle in sizes {
        match waiting(&bin, idle, span) {
            Ok(results) => cpu.extend(results.into_iter().map(|(who, r)| (who, idle, r))),
            Err(e) => {
                eprintln!("error: waiting with {idle} idle connections: {e}");
                failed = true;
            }
        }
    }
    println!("\n{}", render(&detect, &cpu, &sizes));
    goals(&detect, &cpu);
    failed |= detect
        .iter()
        .any(|(w, l)| *w == Who::Prestop && l.len() < runs_prestop);
    failed |= cpu.iter().any(|(w, _, r)| *w == Who::Prestop && r.is_err());
    if failed {
        eprintln!("conns bench: a prestop run failed");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
