//! The kernels' worker pool: the calling thread works too, and never waits for a helper that
//! has not shown up.
//!
//! A barrier pool (candle's) waits for every worker to check in on every product. When a core
//! is busy with another process, its worker runs only now and then, and each of a decoding
//! step's ~200 products waits for it: on 2 cores with one busy, SmolLM2 decoding fell from 43
//! to 6 tok/s. Here items are claimed from a shared cursor; helpers that wake take some, the
//! caller takes the rest, and the caller waits only for items already claimed.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};

/// One parallel loop: items `0..n`, claimed one at a time.
struct Job {
    next: AtomicUsize,
    done: AtomicUsize,
    /// An item panicked on a helper; the caller panics in turn.
    panicked: AtomicBool,
    n: usize,
    /// Borrowed by the caller's frame; see [`run`] for why this is sound.
    work: *const (dyn Fn(usize) + Sync),
}

// SAFETY: `work` is only called while the caller of `run` is blocked in `run`, and the closure
// is `Sync`.
unsafe impl Send for Job {}
unsafe impl Sync for Job {}

impl Job {
    /// Claims and runs items until none are left.
    fn help(&self) {
        loop {
            let i = self.next.fetch_add(1, Ordering::AcqRel);
            if i >= self.n {
                return;
            }
            // SAFETY: an item below `n` was claimed, so the caller is still waiting in `run`
            // (it returns only when every claimed item is done) and `work` is alive.
            let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| unsafe {
                (*self.work)(i)
            }));
            if ran.is_err() {
                self.panicked.store(true, Ordering::Release);
            }
            self.done.fetch_add(1, Ordering::Release);
        }
    }
}

struct Slot {
    generation: u64,
    job: Option<Arc<Job>>,
    /// Helpers asleep on the condvar: only then does a new job pay for a wake-up call.
    sleeping: usize,
}

struct Pool {
    /// The job's number (helpers spin on this without locking) and the job.
    generation: AtomicU64,
    slot: Mutex<Slot>,
    wake: Condvar,
    /// Helpers in addition to the calling thread.
    helpers: usize,
}

/// Spins before a helper sleeps: products come every few microseconds while decoding.
const SPINS: usize = 2_000;

fn pool() -> &'static Pool {
    static POOL: OnceLock<&'static Pool> = OnceLock::new();
    POOL.get_or_init(|| {
        let helpers = candle_core::utils::get_num_threads().saturating_sub(1);
        let pool: &'static Pool = Box::leak(Box::new(Pool {
            generation: AtomicU64::new(0),
            slot: Mutex::new(Slot {
                generation: 0,
                job: None,
                sleeping: 0,
            }),
            wake: Condvar::new(),
            helpers,
        }));
        for i in 0..helpers {
            let spawned = std::thread::Builder::new()
                .name(format!("dynexec-kernel-{i}"))
                .spawn(move || helper(pool));
            if spawned.is_err() {
                break; // the caller does the work alone
            }
        }
        pool
    })
}

fn helper(pool: &'static Pool) {
    let mut seen = 0u64;
    loop {
        let mut job = None;
        for _ in 0..SPINS {
            if pool.generation.load(Ordering::Acquire) != seen {
                let slot = pool.slot.lock().unwrap_or_else(|e| e.into_inner());
                seen = slot.generation;
                job = slot.job.clone();
                break;
            }
            std::hint::spin_loop();
        }
        if job.is_none() && pool.generation.load(Ordering::Acquire) == seen {
            let mut slot = pool.slot.lock().unwrap_or_else(|e| e.into_inner());
            slot.sleeping += 1;
            while slot.generation == seen {
                slot = pool.wake.wait(slot).unwrap_or_else(|e| e.into_inner());
            }
            slot.sleeping -= 1;
            seen = slot.generation;
            job = slot.job.clone();
        }
        if let Some(job) = job {
            job.help();
        }
    }
}

/// The threads a [`run`] can use: the caller and its helpers.
pub fn threads() -> usize {
    pool().helpers + 1
}

/// Runs `work(i)` for every `i` in `0..n`, on the calling thread and whichever helpers are
/// free, returning when all are done.
pub fn run(n: usize, work: &(dyn Fn(usize) + Sync)) {
    let pool = pool();
    if n <= 1 || pool.helpers == 0 {
        (0..n).for_each(work);
        return;
    }
    // SAFETY (of the lifetime erasure): `work` is called only for claimed items below `n`,
    // and this function returns only once every claimed item is done and no item is left
    // to claim; a helper that looks at the job later finds the cursor past `n`.
    let work: *const (dyn Fn(usize) + Sync + '_) = work;
    let job = Arc::new(Job {
        next: AtomicUsize::new(0),
        done: AtomicUsize::new(0),
        panicked: AtomicBool::new(false),
        n,
        work: unsafe { std::mem::transmute::<_, *const (dyn Fn(usize) + Sync)>(work) },
    });
    let sleeping = {
        let mut slot = pool.slot.lock().unwrap_or_else(|e| e.into_inner());
        slot.generation += 1;
        slot.job = Some(job.clone());
        pool.generation.store(slot.generation, Ordering::Release);
        // A helper counts itself asleep and checks the generation under this lock, so one
        // that is not counted here will see the new job without a wake-up.
        slot.sleeping
    };
    if sleeping > 0 {
        pool.wake.notify_all();
    }
    job.help();
    // Only items a helper claimed and is still running remain; should that helper have lost
    // its core, yield rather than spin against it.
    let mut spins = 0;
    while job.done.load(Ordering::Acquire) < n {
        spins += 1;
        if spins < SPINS {
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
    }
    // Late helpers find no job rather than this one's (already exhausted) cursor.
    pool.slot.lock().unwrap_or_else(|e| e.into_inner()).job = None;
    if job.panicked.load(Ordering::Acquire) {
        panic!("a CPU kernel panicked on a helper thread");
    }
}

#[cfg(test)]
mod tests {
    use super::run;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn every_item_runs_exactly_once_across_many_calls() {
        for n in [0usize, 1, 2, 7, 100] {
            for _ in 0..50 {
                let counts: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                run(n, &|i| {
                    counts[i].fetch_add(1, Ordering::Relaxed);
                });
                assert!(counts.iter().all(|c| c.load(Ordering::Relaxed) == 1));
            }
        }
    }
}
