//! What a candidate's processes cost, from /proc: resident memory, and CPU time (the
//! scheduler's run time, in nanoseconds) and context switches summed over every thread of
//! every process. Usage is read before and after a workload; divided by the operations that
//! the workload's rate gives for that whole span (setup included, so a little low), it goes
//! beside the rate.

use std::time::Duration;

/// CPU time and context switches of a set of processes.
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    cpu: Duration,
    voluntary: u64,
    involuntary: u64,
}

impl Usage {
    /// The usage so far of every thread of `pids`.
    pub fn of(pids: &[u32]) -> Self {
        let mut total = Self::default();
        for pid in pids {
            let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
                continue;
            };
            for task in tasks.flatten() {
                let dir = task.path();
                let run_ns = std::fs::read_to_string(dir.join("schedstat"))
                    .ok()
                    .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
                    .unwrap_or(0);
                total.cpu += Duration::from_nanos(run_ns);
                let status = std::fs::read_to_string(dir.join("status")).unwrap_or_default();
                total.voluntary += field(&status, "voluntary_ctxt_switches:");
                total.involuntary += field(&status, "nonvoluntary_ctxt_switches:");
            }
        }
        total
    }

    /// What was used since `before` (threads that ended meanwhile are not counted).
    pub fn since(self, before: Self) -> Self {
        Self {
            cpu: self.cpu.saturating_sub(before.cpu),
            voluntary: self.voluntary.saturating_sub(before.voluntary),
            involuntary: self.involuntary.saturating_sub(before.involuntary),
        }
    }

    /// Per operation: "14.2 µs CPU, 0.18 + 0.01 cs / req" (voluntary + involuntary context
    /// switches).
    pub fn per(self, ops: f64, unit: &str) -> String {
        let ops = ops.max(1.0);
        format!(
            "{:.1} µs CPU, {:.2} + {:.2} cs / {unit}",
            self.cpu.as_secs_f64() * 1e6 / ops,
            self.voluntary as f64 / ops,
            self.involuntary as f64 / ops
        )
    }
}

/// The number after `name` in a /proc status text (0 when absent).
fn field(status: &str, name: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Resident memory of `pids`, in bytes.
pub fn rss(pids: &[u32]) -> u64 {
    pids.iter()
        .map(|pid| {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            field(&status, "VmRSS:") * 1024
        })
        .sum()
}
