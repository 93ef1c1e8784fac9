//! Data parallel training over MPI (the `mpi` cargo feature): `mpirun -np N runtime train ...`
//! starts N processes, each of which finds its rank here and sums gradients through
//! [`MpiCollective`]. Without a launcher, or with a launcher and one process, a run is one
//! process and never touches MPI; a launcher with several processes and a build without the
//! feature is an error (N copies of the same run would each train everything and write to the
//! same folder). docs/DISTRIBUTED.md is the user's side of this.

use crate::backend::Backend;
use crate::engine::{Collective, SingleProcess};
use crate::error::{Error, Result};

/// The number of processes a launcher started, read from the environment it gives each one:
/// MPICH's Hydra (`PMI_SIZE`), Open MPI (`OMPI_COMM_WORLD_SIZE`), Slurm's `srun`
/// (`SLURM_STEP_NUM_TASKS`). `None` outside a launcher.
pub fn launcher_world_size() -> Option<usize> {
    ["PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "SLURM_STEP_NUM_TASKS"].iter().find_map(|k| std::env::var(k).ok()?.trim().parse().ok())
}

/// This process's rank as the launcher says (`PMI_RANK`, `OMPI_COMM_WORLD_RANK`,
/// `SLURM_PROCID`), before MPI is started: rank 0 logs at the `info` level, the others at
/// `warn` (transformers' `log_level_replica`).
pub fn launcher_rank() -> Option<usize> {
    ["PMI_RANK", "OMPI_COMM_WORLD_RANK", "SLURM_PROCID"].iter().find_map(|k| std::env::var(k).ok()?.trim().parse().ok())
}

/// The processes of the run and those on this node, as the launcher says: `(1, 1)` without a
/// launcher; all of them on this node when the launcher does not say.
pub fn launcher_sizes() -> (usize, usize) {
    let world = launcher_world_size().unwrap_or(1).max(1);
    (world, launcher_local_size().unwrap_or(world).clamp(1, world))
}

/// The processes on this node, as the launcher says (Hydra's `MPI_LOCALNRANKS`, Open MPI's
/// `OMPI_COMM_WORLD_LOCAL_SIZE`, Slurm's `SLURM_STEP_TASKS_PER_NODE` when it is one number).
fn launcher_local_size() -> Option<usize> {
    ["MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "SLURM_STEP_TASKS_PER_NODE"].iter().find_map(|k| std::env::var(k).ok()?.trim().parse().ok())
}

/// The collective for this process: [`SingleProcess`] unless a launcher started several
/// processes, then (with the `mpi` feature) MPI, initialised here. Under a launcher, each
/// process also takes its share of the node's cores for its thread pool (unless
/// `RAYON_NUM_THREADS` says otherwise), so that N processes on one node do not run N times the
/// cores' threads.
///
/// `bucket_mib`: the gradients are summed this many MiB at a time (25 when `None`, as torch's
/// DDP buckets). `timeout`: seconds a process waits in one collective operation before it ends
/// the run (`ddp_timeout`; `None`: it waits as long as it takes).
pub fn start<B: Backend>(bucket_mib: Option<usize>, timeout: Option<u64>) -> Result<Box<dyn Collective<B>>> {
    let n = launcher_world_size().unwrap_or(1);
    if n <= 1 {
        return Ok(Box::new(SingleProcess));
    }
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let local = launcher_local_size().unwrap_or(n).max(1);
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        // a pool already built (a second trainer in this process) keeps its size
        let _ = rayon::ThreadPoolBuilder::new().num_threads((cores / local).max(1)).build_global();
    }
    #[cfg_attr(not(feature = "mpi"), allow(unused_mut))]
    let mut c = start_mpi(n, bucket_mib.unwrap_or(25).max(1) << 18)?;
    #[cfg(feature = "mpi")]
    if let Some(secs) = timeout {
        // the processes' heartbeat folder, named after rank 0's process and start time
        let mut token =
            format!("{}-{}", std::process::id(), std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos())).into_bytes();
        c.broadcast_bytes(&mut token)?;
        if c.rank() == 0 {
            watchdog::sweep(&std::env::temp_dir(), watchdog::LEFT_BEHIND);
        }
        let dir = std::env::temp_dir().join(format!("runtime-ddp-{}", String::from_utf8_lossy(&token)));
        watchdog::start(c.rank(), secs, dir);
    }
    let _ = timeout;
    Ok(c)
}

/// `ddp_timeout`: a process that has waited longer than that in one collective operation (the
/// others never came: one is stuck, or gone without the launcher noticing) says so and exits,
/// and the launcher then ends the others. Each MPI call of [`imp::MpiCollective`] is timed by a
/// [`watchdog::Waiting`] guard; a thread checks four times a second.
///
/// To name the process the others wait for, each process's thread also writes a heartbeat once
/// a second into a folder the processes of a node share (the temporary folder, named after rank
/// 0's process): how many collective operations it has entered. The waiting process names the
/// ranks whose count is behind its own (they never reached this operation) or whose heartbeat
/// stopped (a stopped or frozen process); ranks on other nodes are not seen.
#[cfg(feature = "mpi")]
mod watchdog {
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Mutex, OnceLock};
    use std::time::{Duration, Instant, SystemTime};

    /// When the current wait began (milliseconds after [`epoch`], plus 1; 0: not waiting).
    static SINCE: AtomicU64 = AtomicU64::new(0);
    static WHAT: Mutex<&'static str> = Mutex::new("");
    /// The collective operations this process has entered.
    static ENTERED: AtomicU64 = AtomicU64::new(0);
    /// The heartbeat folder and this process's rank, for [`finish`].
    static BEAT: Mutex<Option<(PathBuf, usize)>> = Mutex::new(None);
    /// A heartbeat older than this counts as stopped (a running process writes one every second).
    const STALE: Duration = Duration::from_millis(2500);

    fn epoch() -> Instant {
        static E: OnceLock<Instant> = OnceLock::new();
        *E.get_or_init(Instant::now)
    }

    /// A collective operation in progress; its wait ends when the guard drops.
    pub struct Waiting;

    pub fn waiting(what: &'static str) -> Waiting {
        if let Ok(mut w) = WHAT.lock() {
            *w = what;
        }
        ENTERED.fetch_add(1, Ordering::SeqCst);
        SINCE.store(epoch().elapsed().as_millis() as u64 + 1, Ordering::SeqCst);
        Waiting
    }

    impl Drop for Waiting {
        fn drop(&mut self) {
            SINCE.store(0, Ordering::SeqCst);
        }
    }

    /// This process's heartbeat file in `dir`.
    fn beat_file(dir: &Path, rank: usize) -> PathBuf {
        dir.join(format!("rank-{rank}"))
    }

    /// The ranks of the other processes of this node that the one waiting in operation `entered`
    /// waits for, each with the reason: behind (never reached it) or silent (stopped).
    pub(super) fn suspects(dir: &Path, rank: usize, entered: u64) -> Vec<String> {
        let mut out = Vec::new();
        let Ok(files) = std::fs::read_dir(dir) else { return out };
        let mut found: Vec<(usize, u64, Option<Duration>)> = files
            .flatten()
            .filter_map(|f| {
                let r: usize = f.file_name().to_str()?.strip_prefix("rank-")?.parse().ok()?;
                let n: u64 = std::fs::read_to_string(f.path()).ok()?.trim().parse().ok()?;
                let age = f.metadata().ok()?.modified().ok().and_then(|m| SystemTime::now().duration_since(m).ok());
                Some((r, n, age))
            })
            .filter(|f| f.0 != rank)
            .collect();
        found.sort();
        for (r, n, age) in found {
            if let Some(age) = age.filter(|a| *a > STALE) {
                out.push(format!("rank {r} has not answered for {:.0} s (stopped or frozen)", age.as_secs_f64()));
            } else if n < entered {
                out.push(format!("rank {r} has not reached it (it is at collective operation {n}, this process at {entered})"));
            }
        }
        out
    }

    /// A heartbeat folder none of whose files changed for this long belongs to a run that ended
    /// without removing it (killed, or ended by `ddp_timeout`): running processes write every second.
    pub const LEFT_BEHIND: Duration = Duration::from_secs(600);

    /// Removes the heartbeat folders in `tmp` left behind by runs that ended (nothing in them
    /// changed for `idle`); any that cannot be read or removed stay.
    pub fn sweep(tmp: &Path, idle: Duration) {
        let Ok(entries) = std::fs::read_dir(tmp) else { return };
        let idle_for = |p: &Path| std::fs::metadata(p).ok()?.modified().ok().and_then(|m| SystemTime::now().duration_since(m).ok());
        for e in entries.flatten() {
            let dir = e.path();
            if !e.file_name().to_str().is_some_and(|n| n.starts_with("runtime-ddp-")) || !dir.is_dir() {
                continue;
            }
            let Ok(files) = std::fs::read_dir(&dir) else { continue };
            let stale = std::iter::once(dir.clone()).chain(files.flatten().map(|f| f.path())).all(|p| idle_for(&p).is_some_and(|a| a > idle));
            if stale {
                let _ = std::fs::remove_dir_all(&dir);
            }
        }
    }

    /// Removes this process's heartbeat (and the folder, once empty) after a successful run.
    pub fn finish() {
        if let Some((dir, rank)) = BEAT.lock().ok().and_then(|mut b| b.take()) {
            let _ = std::fs::remove_file(beat_file(&dir, rank));
            let _ = std::fs::remove_dir(&dir);
        }
    }

    pub fn start(rank: usize, secs: u64, dir: PathBuf) {
        epoch();
        let limit = secs.saturating_mul(1000);
        let beats = std::fs::create_dir_all(&dir).is_ok();
        if beats {
            if let Ok(mut b) = BEAT.lock() {
                *b = Some((dir.clone(), rank));
            }
        }
        let mut last_beat: Option<Instant> = None;
        let _ = std::thread::Builder::new().name("ddp-timeout".into()).spawn(move || loop {
            std::thread::sleep(Duration::from_millis(250));
            if beats && last_beat.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                let _ = std::fs::write(beat_file(&dir, rank), ENTERED.load(Ordering::SeqCst).to_string());
                last_beat = Some(Instant::now());
            }
            let since = SINCE.load(Ordering::SeqCst);
            if since == 0 {
                continue;
            }
            let waited = (epoch().elapsed().as_millis() as u64 + 1).saturating_sub(since);
            if waited > limit {
                let what = WHAT.lock().map(|w| *w).unwrap_or("a collective operation");
                let named = if beats { suspects(&dir, rank, ENTERED.load(Ordering::SeqCst)) } else { Vec::new() };
                let _ = std::fs::remove_file(beat_file(&dir, rank));
                let who = if named.is_empty() { "one of them is stuck or gone".to_string() } else { named.join("; ") };
                eprintln!(
                    "error: rank {rank} waited {:.0} s in {what} for the other processes (ddp_timeout = {secs} s): {who}; ending the run (resume with --resume_from_checkpoint true)",
                    waited as f64 / 1000.0
                );
                // SAFETY: `_exit` ends the process at once, without running handlers that could
                // wait on the thread stuck in MPI; the launcher then ends the other processes.
                unsafe { libc::_exit(1) };
            }
        });
    }
}

#[cfg(not(feature = "mpi"))]
fn start_mpi<B: Backend>(n: usize, _bucket: usize) -> Result<Box<dyn Collective<B>>> {
    Err(Error::Unsupported(format!(
        "this process is one of {n} started by an MPI launcher, but this build has no MPI support: build with `cargo build --release --features mpi` (docs/DISTRIBUTED.md)"
    )))
}

#[cfg(feature = "mpi")]
fn start_mpi<B: Backend>(n: usize, bucket: usize) -> Result<Box<dyn Collective<B>>> {
    let c = imp::MpiCollective::start(bucket)?;
    if <imp::MpiCollective as Collective<B>>::world_size(&c) != n {
        return Err(Error::Invalid(format!(
            "the launcher started {n} processes but MPI's world has {}: is this binary built against the MPI library of the launcher in use?",
            <imp::MpiCollective as Collective<B>>::world_size(&c)
        )));
    }
    Ok(Box::new(c))
}

/// Runs `f`, a wait for the other processes outside MPI (a device collective and the device
/// sync after it), under the `ddp_timeout` watchdog as MPI's own calls are: a peer stuck there
/// ends the run with its rank named. Just `f` without the `mpi` feature.
pub fn watched<T>(what: &'static str, f: impl FnOnce() -> T) -> T {
    #[cfg(feature = "mpi")]
    let _waiting = watchdog::waiting(what);
    #[cfg(not(feature = "mpi"))]
    let _ = what;
    f()
}

/// Ends MPI after a successful run (every process calls it; nothing when MPI was not started).
pub fn finish() {
    #[cfg(feature = "mpi")]
    {
        watchdog::finish();
        imp::finish();
    }
}

/// Ends every process of the run at once after this one failed (`MPI_Abort`), so that none is
/// left waiting in a collective for it; nothing when MPI was not started.
pub fn abort_all(code: i32) {
    #[cfg(feature = "mpi")]
    {
        // this process's heartbeat goes (the folder too, once the others' have)
        watchdog::finish();
        imp::abort_all(code);
    }
    let _ = code;
}

#[cfg(feature = "mpi")]
mod imp {
    use std::sync::Mutex;

    use mpi::collective::SystemOperation;
    use mpi::environment::Universe;
    use mpi::topology::SimpleCommunicator;
    use mpi::traits::*;
    use mpi::Threading;

    use crate::backend::Backend;
    use crate::engine::mpi_buckets::{Comms, GradBuckets};
    use crate::engine::Collective;
    use crate::error::{Error, Result};
    use crate::model::Grads;

    /// MPI's environment, from [`MpiCollective::start`] until [`finish`] (dropping it finalises).
    static UNIVERSE: Mutex<Option<Universe>> = Mutex::new(None);

    /// Elements per process per MPI call: MPI counts are C ints.
    const CHUNK: usize = 1 << 28;

    /// Sums over `MPI_COMM_WORLD`. The gradients are summed a bucket at a time, laid end to end, by a
    /// reduce-scatter (each process sums one part) and an all-gather of the parts, so that every
    /// process holds the same bits (an all-reduce may round differently on different ranks, and
    /// ranks whose weights drift apart by a bit would drift further) and each process adds and
    /// sends only its share. Small sums (the per-step numbers) go to rank 0 and back.
    pub struct MpiCollective {
        rank: usize,
        size: usize,
        bucket: usize,
        /// A window of the gradients laid end to end (padded to a multiple of the processes), this
        /// process's summed part of it, and the root's receive buffer of `reduce_to`.
        flat: Vec<f32>,
        part: Vec<f32>,
        received: Vec<f32>,
        /// The communicators of the sums that overlap the backward pass (not in a duplicate,
        /// whose sums are blocking), and their buckets once planned: only when the gradients
        /// live in host memory.
        comms: Option<Comms>,
        buckets: Option<GradBuckets>,
    }

    impl MpiCollective {
        /// `bucket`: gradient elements summed per reduce-scatter and all-gather (what a process
        /// holds besides its gradients while summing them).
        pub fn start(bucket: usize) -> Result<Self> {
            let mut universe = UNIVERSE.lock().map_err(|_| Error::Invalid("MPI's state was poisoned by an earlier failure".into()))?;
            if universe.is_none() {
                if mpi::is_initialized() {
                    return Err(Error::Invalid("MPI was initialised, and finalised, earlier in this process".into()));
                }
                // the thread that initialises MPI is the only one that calls it
                let (u, _) = mpi::initialize_with_threading(Threading::Funneled)
                    .ok_or_else(|| Error::Invalid("MPI could not be initialised (MPI_Init_thread failed)".into()))?;
                *universe = Some(u);
            }
            let world = SimpleCommunicator::world();
            let (rank, size) = (world.rank() as usize, world.size() as usize);
            let comms = Some(Comms::new()?);
            Ok(MpiCollective { rank, size, bucket, flat: Vec::new(), part: Vec::new(), received: Vec::new(), comms, buckets: None })
        }

        /// Gradient elements per MPI call of the sums: a multiple of the processes, whose part
        /// stays within one call's count.
        fn window(&self) -> usize {
            (self.bucket / self.size).clamp(1, CHUNK) * self.size
        }
    }

    /// A gradient's elements on the host: its host copy when it has one, else the buffer itself.
    fn host_slice<'a, B: Backend>(backend: &B, t: &'a mut B::Buf, copy: &'a mut Option<Vec<f32>>) -> &'a mut [f32] {
        match copy {
            Some(c) => c.as_mut_slice(),
            None => backend.host_mut(t).unwrap_or_default(),
        }
    }

    impl<B: Backend> Collective<B> for MpiCollective {
        fn rank(&self) -> usize {
            self.rank
        }
        fn world_size(&self) -> usize {
            self.size
        }
        fn plan_grads(&mut self, backend: &B, groups: &[Vec<usize>], grads: &mut [B::Buf]) -> Result<()> {
            let lens: Vec<usize> = grads.iter().map(|t| backend.len(t)).collect();
            if self.buckets.as_ref().is_some_and(|b| b.fits(&lens)) {
                return Ok(());
            }
            // (the same on every process: the same backend)
            let host = grads.iter_mut().all(|t| backend.len(t) == 0 || backend.host_mut(t).is_some());
            let window = self.window();
            self.buckets = self.comms.filter(|_| host).map(|c| GradBuckets::plan(c, self.size, window, groups, &lens));
            Ok(())
        }
        fn grads_ready(&mut self, backend: &B, params: &[usize], grads: &mut [B::Buf]) -> Result<()> {
            match &mut self.buckets {
                Some(b) => b.ready(backend, params, grads),
                None => Ok(()),
            }
        }
        fn all_reduce_grads(&mut self, backend: &B, grads: &mut Grads<B>) -> Result<()> {
            let _waiting = super::watchdog::waiting("the gradient sum");
            let started = std::time::Instant::now();
            if let Some(b) = &mut self.buckets {
                let (total, buckets, early) = b.finish(backend, &mut grads.tensors)?;
                tracing::debug!(
                    "gradients summed over {} processes: {:.1} MiB in {buckets} buckets, {early} started during the backward pass; {:.1} ms after it",
                    self.size,
                    total as f64 * 4.0 / 1048576.0,
                    started.elapsed().as_secs_f64() * 1e3
                );
                return Ok(());
            }
            // host copies of the buffers that do not live on the host
            let mut copies: Vec<Option<Vec<f32>>> = Vec::with_capacity(grads.tensors.len());
            for t in &mut grads.tensors {
                let needs_copy = backend.len(t) > 0 && backend.host_mut(t).is_none();
                copies.push(if needs_copy { Some(backend.download(t)?) } else { None });
            }
            // the gradients laid end to end, a window at a time: each window is summed by a
            // reduce-scatter and an all-gather, and copied back
            // (a process's part of a window stays within one MPI call's count)
            let window = self.window();
            let (mut flat, mut part) = (std::mem::take(&mut self.flat), std::mem::take(&mut self.part));
            let mut pieces: Vec<(usize, usize, usize)> = Vec::new();
            let (mut i, mut start, mut total) = (0, 0, 0);
            loop {
                flat.clear();
                while flat.len() < window && i < grads.tensors.len() {
                    let src = host_slice(backend, &mut grads.tensors[i], &mut copies[i]);
                    if start >= src.len() {
                        (i, start) = (i + 1, 0);
                        continue;
                    }
                    let n = (window - flat.len()).min(src.len() - start);
                    flat.extend_from_slice(&src[start..start + n]);
                    pieces.push((i, start, n));
                    start += n;
                }
                if flat.is_empty() {
                    break;
                }
                total += flat.len();
                flat.resize(flat.len().next_multiple_of(self.size), 0.0);
                part.resize(flat.len() / self.size, 0.0);
                let world = SimpleCommunicator::world();
                world.reduce_scatter_block_into(&flat[..], &mut part[..], SystemOperation::sum());
                world.all_gather_into(&part[..], &mut flat[..]);
                let mut at = 0;
                for (t, s, n) in pieces.drain(..) {
                    let dst = host_slice(backend, &mut grads.tensors[t], &mut copies[t]);
                    dst[s..s + n].copy_from_slice(&flat[at..at + n]);
                    at += n;
                }
            }
            for (t, copy) in grads.tensors.iter_mut().zip(copies) {
                if let Some(c) = copy {
                    let up = backend.upload(&c)?;
                    backend.copy(t, &up);
                }
            }
            (self.flat, self.part) = (flat, part);
            tracing::debug!(
                "gradients summed over {} processes: {:.1} MiB in {:.1} ms",
                self.size,
                total as f64 * 4.0 / 1048576.0,
                started.elapsed().as_secs_f64() * 1e3
            );
            Ok(())
        }
        fn reduce_to(&mut self, root: usize, data: &mut [f32]) -> Result<()> {
            let _waiting = super::watchdog::waiting("a reduce");
            let world = SimpleCommunicator::world();
            let root_process = world.process_at_rank(root as i32);
            // pieces of 4 Mi elements: the receive buffer stays small
            for piece in data.chunks_mut(1 << 22) {
                if self.rank == root {
                    self.received.resize(piece.len(), 0.0);
                    root_process.reduce_into_root(&*piece, &mut self.received[..piece.len()], SystemOperation::sum());
                    piece.copy_from_slice(&self.received[..piece.len()]);
                } else {
                    root_process.reduce_into(&*piece, SystemOperation::sum());
                }
            }
            Ok(())
        }
        fn broadcast_from(&mut self, root: usize, data: &mut [f32]) -> Result<()> {
            let _waiting = super::watchdog::waiting("a broadcast");
            let world = SimpleCommunicator::world();
            for piece in data.chunks_mut(CHUNK) {
                world.process_at_rank(root as i32).broadcast_into(piece);
            }
            Ok(())
        }
        fn sum_f64(&mut self, values: &mut [f64]) -> Result<()> {
            let _waiting = super::watchdog::waiting("the step's sums");
            let world = SimpleCommunicator::world();
            let root = world.process_at_rank(0);
            if self.rank == 0 {
                let mut out = vec![0.0; values.len()];
                root.reduce_into_root(&*values, &mut out[..], SystemOperation::sum());
                values.copy_from_slice(&out);
            } else {
                root.reduce_into(&*values, SystemOperation::sum());
            }
            root.broadcast_into(values);
            Ok(())
        }
        fn gather_bytes(&mut self, data: &[u8]) -> Result<Option<Vec<Vec<u8>>>> {
            let _waiting = super::watchdog::waiting("a gather");
            let world = SimpleCommunicator::world();
            if self.rank != 0 {
                world.process_at_rank(0).send(data);
                return Ok(None);
            }
            let mut all = vec![data.to_vec()];
            for r in 1..self.size {
                all.push(world.process_at_rank(r as i32).receive_vec::<u8>().0);
            }
            Ok(Some(all))
        }
        fn broadcast_bytes(&mut self, data: &mut Vec<u8>) -> Result<()> {
            let _waiting = super::watchdog::waiting("a broadcast");
            let world = SimpleCommunicator::world();
            let root = world.process_at_rank(0);
            let mut len = data.len() as u64;
            root.broadcast_into(&mut len);
            data.resize(len as usize, 0);
            root.broadcast_into(&mut data[..]);
            Ok(())
        }
        fn all_gather_u64(&mut self, value: u64) -> Result<Vec<u64>> {
            let _waiting = super::watchdog::waiting("an all-gather");
            let mut all = vec![0u64; self.size];
            SimpleCommunicator::world().all_gather_into(&value, &mut all[..]);
            Ok(all)
        }
        fn barrier(&mut self) -> Result<()> {
            let _waiting = super::watchdog::waiting("a barrier");
            SimpleCommunicator::world().barrier();
            Ok(())
        }
        fn duplicate(&self) -> Result<Box<dyn Collective<B>>> {
            let (rank, size, bucket) = (self.rank, self.size, self.bucket);
            Ok(Box::new(MpiCollective { rank, size, bucket, flat: Vec::new(), part: Vec::new(), received: Vec::new(), comms: None, buckets: None }))
        }
    }

    pub fn finish() {
        if let Ok(mut u) = UNIVERSE.lock() {
            u.take();
        }
    }

    pub fn abort_all(code: i32) {
        let started = UNIVERSE.lock().map(|u| u.is_some()).unwrap_or(true);
        if started {
            SimpleCommunicator::world().abort(code);
        }
    }
}

#[cfg(all(test, feature = "mpi"))]
mod tests {
    use std::time::{Duration, SystemTime};

    /// Rank 0 removes the heartbeat folders of runs that ended without removing theirs, and
    /// nothing else.
    #[test]
    fn heartbeat_folders_left_behind_are_swept_and_live_ones_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let old = SystemTime::now() - Duration::from_secs(3600);
        let make = |name: &str, age: Option<SystemTime>| {
            let dir = tmp.path().join(name);
            std::fs::create_dir(&dir).unwrap();
            let beat = dir.join("rank-0");
            std::fs::write(&beat, "7").unwrap();
            if let Some(t) = age {
                std::fs::File::options().write(true).open(&beat).unwrap().set_modified(t).unwrap();
                std::fs::File::open(&dir).unwrap().set_modified(t).unwrap();
            }
            dir
        };
        let dead = make("runtime-ddp-1-2", Some(old));
        let live = make("runtime-ddp-3-4", None);
        let other = make("someone-else", Some(old));
        // a folder whose own time is old but with one fresh heartbeat is still in use
        let mixed = make("runtime-ddp-5-6", Some(old));
        std::fs::write(mixed.join("rank-1"), "7").unwrap();
        std::fs::File::open(&mixed).unwrap().set_modified(old).unwrap();
        super::watchdog::sweep(tmp.path(), Duration::from_secs(600));
        assert!(!dead.exists(), "a run's folder left behind an hour ago is removed");
        assert!(live.exists() && other.exists() && mixed.exists(), "live runs' folders and other folders stay");
    }

    /// The waiting process names the ranks behind it and the silent ones, not itself nor those
    /// in step with it.
    #[test]
    fn the_heartbeats_name_the_ranks_behind_and_the_silent_ones() {
        let dir = tempfile::tempdir().unwrap();
        for (r, n) in [(0, 42), (1, 41), (2, 42), (3, 42)] {
            std::fs::write(dir.path().join(format!("rank-{r}")), n.to_string()).unwrap();
        }
        let old = std::fs::File::options().write(true).open(dir.path().join("rank-3")).unwrap();
        old.set_modified(SystemTime::now() - Duration::from_secs(9)).unwrap();
        std::fs::write(dir.path().join("notes"), "not a heartbeat").unwrap();
        let named = super::watchdog::suspects(dir.path(), 0, 42);
        assert_eq!(named.len(), 2, "{named:?}");
        assert!(named[0].starts_with("rank 1 has not reached it (it is at collective operation 41, this process at 42)"), "{named:?}");
        assert!(named[1].starts_with("rank 3 has not answered for 9 s"), "{named:?}");
        assert!(super::watchdog::suspects(&dir.path().join("missing"), 0, 42).is_empty());
    }
}
