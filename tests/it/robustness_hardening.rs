//! The serving process holds every approved DEK (issue 17): it writes no
//! core dump, and locks its memory where RLIMIT_MEMLOCK allows, saying so
//! in its log where it does not.

use crate::common;

use std::time::{Duration, Instant};

use common::*;

/// A line of /proc/<pid>/<file> starting with `prefix`.
fn proc_line(pid: u32, file: &str, prefix: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/{file}"))
        .expect("read /proc")
        .lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no {prefix} in /proc/{pid}/{file}"))
        .to_owned()
}

#[test]
fn serving_process_writes_no_core_dump_and_reports_memory_locking() {
    let pg = pg();
    let proxy = start_proxy(&pg, "");
    let core = proc_line(proxy.pid(), "limits", "Max core file size");
    let fields: Vec<&str> = core.split_whitespace().collect();
    assert_eq!(&fields[4..6], ["0", "0"], "{core}");
    // The log says which way memory locking went, and the kernel agrees.
    let deadline = Instant::now() + Duration::from_secs(10);
    let log = loop {
        let log = proxy.log_text();
        if log.contains("process hardened") || Instant::now() > deadline {
            break log;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(log.contains("core_dumps=false"), "{log}");
    let locked_kib: u64 = proc_line(proxy.pid(), "status", "VmLck:")
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .expect("VmLck");
    if log.contains("memory_locked=true") {
        assert!(locked_kib > 0, "{log}");
    } else {
        assert!(log.contains("memory_locked=false"), "{log}");
        assert_eq!(locked_kib, 0);
    }
}
