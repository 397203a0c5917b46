//! `sluice-bench baseline`: what this machine can do at all, measured in the same run as
//! Sluice, so the broker's figures can be read as fractions of a physical limit.
//!
//! - Raw loopback TCP: one thread writes length-prefixed frames of `message_size` bytes
//!   (`u32` length, then the payload), `--batch-bytes` at a time, as a producer's batches
//!   would go; another reads them through a null sink that walks every frame header and
//!   discards the payload. Rate = frames the sink counted per second.
//! - Page-cache append: the same writes appended to a file, never synced.
//! - fdatasync per batch: write one `--batch-bytes` batch, `fdatasync`, repeat (at most
//!   [`SYNC_BATCHES_MAX`] batches or [`SYNC_TIME_MAX`]): the rate of a log that syncs every batch
//!   on its own, and the latency of one sync. A serial reference, not a ceiling: Sluice's
//!   durable producer keeps up to [`MAX_IN_FLIGHT_IDEMPOTENT`] batches in flight and one fsync
//!   covers all that arrived, so it is measured as well with one `fdatasync` per that many
//!   batches, nearer what the disk can take.
//! - Machine stalls ([`super::stalls`]): a thread per core spins reading the clock for
//!   `--latency-duration` seconds and counts the gaps of 100 µs or more, times no program ran
//!   there; a latency tail is read beside them.
//! - One-way latency over raw loopback TCP at [`LATENCY_RATE`] messages a second for
//!   `--latency-duration` seconds: one thread sleeps until each message is due, stamps it with the time and
//!   writes it; another reads and records its arrival. Two threads and one hop: what the
//!   machine's scheduler and loopback add to any message's way, the floor under the latency
//!   workload's three hops (producer, broker, consumer).
//! - Sluice, embedded, 1 producer and 1 partition, batches of `--batch-bytes`: produce with
//!   `acks=leader`, produce with `acks=durable`, and a group of one consuming what a fill put
//!   there; each beside the limits as ratios. This machine's speed drifts within minutes, so
//!   raw loopback TCP is measured again right before each of Sluice's runs, and each "× raw
//!   TCP" is against that measurement. Then the latency workload at the same rate and
//!   for as long as the raw one, beside it.
//!
//! Files go to `$SLUICE_BENCH_DIR` or the system temporary directory: the disk being measured.
//!
//! Order and warm-up: both latency measurements run first, then the stall probe, before
//! anything has written and freed gigabytes (on a virtual machine the host takes freed memory
//! back over the next seconds and stalls the guest for milliseconds at a time). Before each
//! throughput measurement that writes files (page-cache append, fdatasync, each of Sluice's) a
//! scratch file of twice its messages' bytes (at most [`WARM_UP_MAX_BYTES`]) is written and
//! deleted: the measurement then writes into page-cache pages the host backs, as a broker that
//! has run for a while does, rather than into pages whose first touch costs a host fault (on
//! the development VM a page-cache write ran at 1.15 GB/s into such pages and 5.2 GB/s into
//! backed ones). Limits and Sluice get the same treatment, so their ratios stay fair.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use hdrhistogram::Histogram;

use super::cli::{
    BaselineArgs, DEFAULT_LATENCY_RATE, DEFAULT_LINGER_MS, DEFAULT_RECORDS_PER_SEND, Settings,
    Stop, Target, Transport, Workload,
};
use super::machine::Machine;
use super::metrics::LatencySummary;
use super::progress::group_digits;
use super::stalls::Stalls;
use super::target::scratch_base;
use super::workloads::{self, RunResult};
use sluice_broker::storage::fs::{FileHandle, FileSystem};
use sluice_broker::storage::log::reservation_end;
use sluice_broker::storage::{FsyncPolicy, RealFs};
use sluice_client::producer::{Acks, MAX_IN_FLIGHT_IDEMPOTENT};

/// The fdatasync measurement stops after this many batches...
pub const SYNC_BATCHES_MAX: u64 = 1_000;
/// ...or this long, whichever comes first.
pub const SYNC_TIME_MAX: Duration = Duration::from_secs(3);
/// Messages per second of the latency measurements (the latency workload's default rate).
pub const LATENCY_RATE: u64 = DEFAULT_LATENCY_RATE;
/// The largest warm-up file.
pub const WARM_UP_MAX_BYTES: u64 = 3 << 30;
/// The smallest: below this a warm-up costs nothing worth saving.
const WARM_UP_MIN_BYTES: u64 = 64 << 20;
/// Bytes before each frame on the wire: its length.
const LENGTH_PREFIX_BYTES: usize = 4;

/// A rate measured over some messages.
#[derive(Clone, Copy, Debug)]
pub struct Rate {
    pub messages: u64,
    pub elapsed: Duration,
}

impl Rate {
    pub fn messages_per_second(&self) -> f64 {
        self.messages as f64 / self.elapsed.as_secs_f64().max(f64::MIN_POSITIVE)
    }
}

/// The fdatasync-per-batch measurement.
#[derive(Clone, Copy, Debug)]
pub struct SyncRate {
    pub rate: Rate,
    pub batches: u64,
    /// Of the fdatasync call alone.
    pub latency: Option<LatencySummary>,
}

/// Frames of `message_size` bytes, as many as fit in `write_bytes` (at least one).
fn framed_batch(message_size: usize, write_bytes: usize) -> (Vec<u8>, u64) {
    let frame_bytes = LENGTH_PREFIX_BYTES + message_size;
    let frames = (write_bytes / frame_bytes).max(1);
    let mut batch = Vec::with_capacity(frames * frame_bytes);
    let length = u32::try_from(message_size).expect("message_size is at most 1,000,000");
    for _ in 0..frames {
        batch.extend_from_slice(&length.to_be_bytes());
        batch.resize(batch.len() + message_size, 0x5a);
    }
    (batch, frames as u64)
}

/// Writes `messages` frames to `sink`, a batch of at most `write_bytes` at a time.
fn write_frames(
    sink: &mut impl Write,
    message_size: usize,
    write_bytes: usize,
    messages: u64,
) -> std::io::Result<()> {
    let (batch, frames_per_batch) = framed_batch(message_size, write_bytes);
    let frame_bytes = LENGTH_PREFIX_BYTES + message_size;
    let mut left = messages;
    while left > 0 {
        let frames = left.min(frames_per_batch);
        sink.write_all(&batch[..frames as usize * frame_bytes])?;
        left -= frames;
    }
    Ok(())
}

/// Counts the frames arriving on `stream` until it closes, discarding their payloads.
fn null_sink(mut stream: TcpStream, message_size: usize) -> std::io::Result<u64> {
    let mut buffer = vec![0u8; (2 * (LENGTH_PREFIX_BYTES + message_size)).max(1 << 20)];
    let mut filled = 0;
    let mut frames = 0u64;
    loop {
        let read = stream.read(&mut buffer[filled..])?;
        if read == 0 {
            return Ok(frames);
        }
        filled += read;
        let mut at = 0;
        while let Some(prefix) = buffer.get(at..at + LENGTH_PREFIX_BYTES) {
            let length = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
            let end = at + LENGTH_PREFIX_BYTES + length;
            if end > filled {
                break;
            }
            frames += 1;
            at = end;
        }
        buffer.copy_within(at..filled, 0);
        filled -= at;
        if filled == buffer.len() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "a frame longer than the sink's buffer",
            ));
        }
    }
}

/// Runs `read` on the accepting end of a loopback TCP connection, in a thread of its own, and
/// `write` on the connecting end, both with Nagle off as the broker's and the client's sockets
/// are; returns what each returned.
///
/// # Errors
/// No loopback listener, or the reading thread panicked.
fn over_loopback<T: Send + 'static>(
    read: impl FnOnce(TcpStream) -> std::io::Result<T> + Send + 'static,
    write: impl FnOnce(TcpStream) -> std::io::Result<()>,
) -> Result<(std::io::Result<T>, std::io::Result<()>)> {
    let listener = TcpListener::bind("127.0.0.1:0").context("cannot listen on loopback")?;
    let address = listener.local_addr()?;
    let reader = std::thread::spawn(move || {
        let (stream, _) = listener.accept()?;
        stream.set_nodelay(true)?;
        read(stream)
    });
    let written = TcpStream::connect(address).and_then(|stream| {
        stream.set_nodelay(true)?;
        write(stream)
    });
    let read = reader
        .join()
        .map_err(|_| anyhow!("the loopback reading thread failed"))?;
    Ok((read, written))
}

/// Raw loopback TCP through a null sink.
///
/// # Errors
/// A socket error, or a sink that did not count every frame.
pub fn raw_tcp(message_size: usize, write_bytes: usize, messages: u64) -> Result<Rate> {
    // From the first write, once connected (as Sluice's runs start with their connections
    // made), to the sink's count of the last frame.
    let started = std::cell::Cell::new(None);
    let (counted, sent) = over_loopback(
        move |stream| null_sink(stream, message_size),
        |mut stream| {
            started.set(Some(Instant::now()));
            write_frames(&mut stream, message_size, write_bytes, messages)?;
            stream.shutdown(Shutdown::Write)
        },
    )?;
    let elapsed = started
        .get()
        .map_or(Duration::ZERO, |start| start.elapsed());
    sent.context("loopback TCP: sending")?;
    let counted = counted.context("loopback TCP: the null sink")?;
    if counted != messages {
        anyhow::bail!("loopback TCP: the sink counted {counted} of {messages} frames");
    }
    Ok(Rate { messages, elapsed })
}

/// One-way latency over raw loopback TCP: `rate` messages of `message_size` bytes (at least
/// the 8 of the stamp) a second for `duration`, each written when due with its send time in
/// its first 8 bytes, and timed as the reader gets its last byte.
///
/// # Errors
/// A socket error, or a reader that did not get every message.
pub fn raw_tcp_latency(
    message_size: usize,
    rate: u64,
    duration: Duration,
) -> Result<LatencySummary> {
    let message_size = message_size.max(8);
    let messages = (rate as f64 * duration.as_secs_f64()).ceil().max(1.0) as u64;
    let epoch = Instant::now();
    let read = move |mut stream: TcpStream| -> std::io::Result<Histogram<u64>> {
        let mut latencies = Histogram::<u64>::new_with_max(60_000_000, 3)
            .expect("constant histogram bounds are valid");
        let mut message = vec![0u8; message_size];
        for _ in 0..messages {
            stream.read_exact(&mut message)?;
            let arrived = epoch.elapsed();
            let stamp = u64::from_be_bytes(message[..8].try_into().expect("8 bytes"));
            let sent = Duration::from_nanos(stamp);
            latencies.saturating_record(
                u64::try_from(arrived.saturating_sub(sent).as_micros()).unwrap_or(u64::MAX),
            );
        }
        Ok(latencies)
    };
    let write = |mut stream: TcpStream| -> std::io::Result<()> {
        let mut message = vec![0x5au8; message_size];
        let interval = Duration::from_secs(1).div_f64(rate.max(1) as f64);
        super::workloads::precise_sleeps();
        let start = Instant::now();
        for index in 0..messages {
            let due = start + interval.mul_f64(index as f64);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            // From when it was due, as the latency workload times its records.
            let stamp =
                u64::try_from(due.saturating_duration_since(epoch).as_nanos()).unwrap_or(u64::MAX);
            message[..8].copy_from_slice(&stamp.to_be_bytes());
            stream.write_all(&message)?;
        }
        Ok(())
    };
    let (latencies, sent) = over_loopback(read, write)?;
    sent.context("loopback TCP latency: sending")?;
    let latencies = latencies.context("loopback TCP latency: reading")?;
    LatencySummary::of(&latencies).ok_or_else(|| anyhow!("no latency was recorded"))
}

/// Appends to a file in the page cache, never syncing. With `reserve_ahead` the file's disk
/// space is reserved ahead of the writes, as the broker does for a segment's big appends.
///
/// # Errors
/// The file cannot be created or written, or its space not reserved.
pub fn page_cache_append(
    directory: &Path,
    message_size: usize,
    write_bytes: usize,
    messages: u64,
    reserve_ahead: bool,
) -> Result<Rate> {
    let mut file = tempfile::NamedTempFile::new_in(directory)
        .with_context(|| format!("cannot create a file in {}", directory.display()))?;
    let start = Instant::now();
    let written = if reserve_ahead {
        ReservingAhead::new(file.path()).and_then(|mut reserving| {
            write_frames(&mut reserving, message_size, write_bytes, messages)
        })
    } else {
        write_frames(file.as_file_mut(), message_size, write_bytes, messages)
    };
    written.context("page-cache append")?;
    Ok(Rate {
        messages,
        elapsed: start.elapsed(),
    })
}

/// A file appended to whose disk space is reserved ahead whenever a write would pass the
/// reservation, as far as the broker reserves a segment's for its appends of 64 KiB and more
/// ([`reservation_end`]), through the broker's own filesystem calls
/// (`StorageFile::preallocate`).
struct ReservingAhead {
    file: FileHandle,
    written: u64,
    reserved: u64,
}

impl ReservingAhead {
    fn new(path: &Path) -> std::io::Result<ReservingAhead> {
        Ok(ReservingAhead {
            file: RealFs.open(path, true)?,
            written: 0,
            reserved: 0,
        })
    }
}

impl Write for ReservingAhead {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let end = self.written + buf.len() as u64;
        if end > self.reserved {
            let to = reservation_end(end, buf.len() as u64);
            self.file.preallocate(self.written, to - self.written)?;
            self.reserved = to;
        }
        self.file.write_all_at(buf, self.written)?;
        self.written = end;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Writes batches of at most `frames_per_write` messages and fdatasyncs after every
/// `writes_per_sync` of them, again and again.
///
/// # Errors
/// The file cannot be created, written or synced.
pub fn fdatasync_per_batch(
    directory: &Path,
    message_size: usize,
    write_bytes: usize,
    messages: u64,
    frames_per_write: u64,
    writes_per_sync: u64,
) -> Result<SyncRate> {
    let mut file = tempfile::tempfile_in(directory)
        .with_context(|| format!("cannot create a file in {}", directory.display()))?;
    let (batch, frames_per_batch) = framed_batch(message_size, write_bytes);
    let frames_per_batch = frames_per_batch.min(frames_per_write.max(1));
    let writes_per_sync = writes_per_sync.max(1);
    let mut latencies =
        Histogram::<u64>::new_with_max(60_000_000, 3).expect("constant histogram bounds are valid");
    let mut written = 0u64;
    let mut batches = 0u64;
    let start = Instant::now();
    while written < messages && batches < SYNC_BATCHES_MAX && start.elapsed() < SYNC_TIME_MAX {
        for _ in 0..writes_per_sync {
            let frames = (messages - written).min(frames_per_batch);
            if frames == 0 {
                break;
            }
            let bytes = frames as usize * (LENGTH_PREFIX_BYTES + message_size);
            file.write_all(&batch[..bytes])
                .context("fdatasync: writing")?;
            written += frames;
        }
        let sync_start = Instant::now();
        file.sync_data().context("fdatasync")?;
        latencies
            .saturating_record(u64::try_from(sync_start.elapsed().as_micros()).unwrap_or(u64::MAX));
        batches += 1;
    }
    Ok(SyncRate {
        rate: Rate {
            messages: written,
            elapsed: start.elapsed(),
        },
        batches,
        latency: LatencySummary::of(&latencies),
    })
}

/// The settings of one of Sluice's figures.
fn sluice_settings(workload: Workload, arguments: &BaselineArgs, acks: Acks) -> Settings {
    let fsync = FsyncPolicy::default();
    Settings {
        workload,
        target: Target::Embedded { fsync },
        transport: Transport::Tcp,
        producers: 1,
        consumers: u32::from(workload.has_consumers()),
        partitions: 1,
        message_size: arguments.message_size,
        stop: Stop::Messages(arguments.messages),
        batch_bytes: arguments.batch_bytes,
        linger: Duration::from_millis(DEFAULT_LINGER_MS),
        records_per_send: DEFAULT_RECORDS_PER_SEND,
        acks,
        fsync_label: fsync.to_string(),
        rate: None,
        json: None,
        chart: None,
    }
}

/// The physical limits.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub tcp: Rate,
    pub page_cache: Rate,
    /// The same appends with the file's space reserved ahead of them.
    pub page_cache_reserved: Rate,
    pub fdatasync_per_batch: SyncRate,
    /// One fdatasync per [`MAX_IN_FLIGHT_IDEMPOTENT`] batches.
    pub fdatasync_per_in_flight: SyncRate,
    pub fdatasync_per_message: SyncRate,
    pub tcp_latency: LatencySummary,
    /// The cores' own stalls, probed while nothing else ran.
    pub stalls: Stalls,
}

/// Everything `baseline` measured.
#[derive(Debug)]
pub struct Baseline {
    pub limits: Limits,
    pub produce_leader: RunResult,
    pub produce_durable: RunResult,
    pub consume: RunResult,
    /// Raw loopback TCP measured right before each of the three runs above, in their order.
    pub tcp_before: [Rate; 3],
    pub latency: RunResult,
}

/// Writes a scratch file of `bytes` (clamped to [`WARM_UP_MIN_BYTES`]..=[`WARM_UP_MAX_BYTES`])
/// in `directory` and deletes it, then waits for the disk to have nothing dirty (see the module
/// comment).
///
/// # Errors
/// The file cannot be created or written.
pub fn warm_up(directory: &Path, bytes: u64) -> Result<()> {
    let bytes = bytes.clamp(WARM_UP_MIN_BYTES, WARM_UP_MAX_BYTES);
    let chunk = vec![0u8; 1 << 20];
    {
        let mut file = tempfile::tempfile_in(directory)
            .with_context(|| format!("cannot create a file in {}", directory.display()))?;
        let mut written = 0u64;
        while written < bytes {
            file.write_all(&chunk).context("warm-up: writing")?;
            written += chunk.len() as u64;
        }
    }
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
    Ok(())
}

/// What to warm up before a measurement of `messages` messages of `message_size`: twice their
/// bytes, as a log's record and batch headers and the broker's other files add to them.
fn written_bytes(message_size: usize, messages: u64) -> u64 {
    messages.saturating_mul(2 * (message_size + LENGTH_PREFIX_BYTES) as u64)
}

/// Measures the one-way latency floor (blocking: call it outside the async runtime, and
/// before anything writes gigabytes).
///
/// # Errors
/// A socket error.
pub fn measure_latency_floor(arguments: &BaselineArgs) -> Result<LatencySummary> {
    raw_tcp_latency(
        arguments.message_size as usize,
        LATENCY_RATE,
        Duration::from_secs(arguments.latency_duration),
    )
}

/// Measures the physical limits of throughput (blocking: call it outside the async runtime).
///
/// # Errors
/// Any measurement failing.
pub fn measure_limits(
    arguments: &BaselineArgs,
    tcp_latency: LatencySummary,
    stalls: Stalls,
) -> Result<Limits> {
    let message_size = arguments.message_size as usize;
    let write_bytes = arguments.batch_bytes as usize;
    let directory = scratch_base();
    let tcp = raw_tcp(message_size, write_bytes, arguments.messages)?;
    let bytes = written_bytes(message_size, arguments.messages);
    warm_up(&directory, bytes)?;
    let append = |reserve_ahead| {
        page_cache_append(
            &directory,
            message_size,
            write_bytes,
            arguments.messages,
            reserve_ahead,
        )
    };
    let page_cache = append(false)?;
    warm_up(&directory, bytes)?;
    let page_cache_reserved = append(true)?;
    let synced = |frames_per_write: u64, writes_per_sync: u64| {
        fdatasync_per_batch(
            &directory,
            message_size,
            write_bytes,
            arguments.messages,
            frames_per_write,
            writes_per_sync,
        )
    };
    warm_up(&directory, bytes)?;
    let per_batch = synced(u64::MAX, 1)?;
    warm_up(&directory, bytes)?;
    let per_in_flight = synced(u64::MAX, MAX_IN_FLIGHT_IDEMPOTENT as u64)?;
    let per_message = synced(1, 1)?;
    Ok(Limits {
        tcp,
        page_cache,
        page_cache_reserved,
        fdatasync_per_batch: per_batch,
        fdatasync_per_in_flight: per_in_flight,
        fdatasync_per_message: per_message,
        tcp_latency,
        stalls,
    })
}

/// Sluice's latency workload at [`LATENCY_RATE`], embedded (run it before anything writes
/// gigabytes).
///
/// # Errors
/// The run failing.
pub async fn measure_sluice_latency(arguments: &BaselineArgs) -> Result<RunResult> {
    workloads::run(&Settings {
        stop: Stop::After(Duration::from_secs(arguments.latency_duration)),
        rate: Some(LATENCY_RATE),
        linger: Duration::ZERO,
        ..sluice_settings(Workload::Latency, arguments, Acks::Leader)
    })
    .await
}

/// Sluice's throughput figures: produce (leader, durable) and consume, embedded, each after a
/// warm-up and right after raw loopback TCP measured again (returned in the same order).
///
/// # Errors
/// A run failing.
pub async fn measure_sluice(arguments: &BaselineArgs) -> Result<([RunResult; 3], [Rate; 3])> {
    let bytes = written_bytes(arguments.message_size as usize, arguments.messages);
    let (message_size, write_bytes, messages) = (
        arguments.message_size as usize,
        arguments.batch_bytes as usize,
        arguments.messages,
    );
    let prepare = || {
        let directory = scratch_base();
        tokio::task::spawn_blocking(move || {
            warm_up(&directory, bytes)?;
            raw_tcp(message_size, write_bytes, messages)
        })
    };
    let tcp_leader = prepare().await??;
    let produce_leader =
        workloads::run(&sluice_settings(Workload::Produce, arguments, Acks::Leader)).await?;
    let tcp_durable = prepare().await??;
    let produce_durable = workloads::run(&sluice_settings(
        Workload::Produce,
        arguments,
        Acks::Durable,
    ))
    .await?;
    let tcp_consume = prepare().await??;
    let consume =
        workloads::run(&sluice_settings(Workload::Consume, arguments, Acks::Leader)).await?;
    Ok((
        [produce_leader, produce_durable, consume],
        [tcp_leader, tcp_durable, tcp_consume],
    ))
}

fn ratio(value: f64, limit: f64) -> String {
    let ratio = value / limit.max(f64::MIN_POSITIVE);
    if ratio < 0.1 {
        format!("{ratio:.3}")
    } else {
        format!("{ratio:.2}")
    }
}

impl Baseline {
    /// The table `baseline` prints.
    pub fn table(&self, arguments: &BaselineArgs, machine: &Machine) -> String {
        let size = f64::from(arguments.message_size);
        let megabytes = |rate: f64| rate * size / 1e6;
        let tcp = self.limits.tcp.messages_per_second();
        let page_cache = self.limits.page_cache.messages_per_second();
        let synced = self.limits.fdatasync_per_batch.rate.messages_per_second();
        let mut lines = vec![
            format!(
                "sluice-bench baseline: {} B messages, {} per measurement, batches and writes of {} B",
                arguments.message_size,
                group_digits(arguments.messages),
                group_digits(u64::from(arguments.batch_bytes))
            ),
            format!("  machine: {machine}"),
            format!("  files in: {}", scratch_base().display()),
            String::new(),
            format!("  {:<44}{:>14}{:>10}", "physical limits", "msgs/s", "MB/s"),
        ];
        let row = |label: &str, rate: f64, note: String| {
            let line = format!(
                "  {:<44}{:>14}{:>10.1}  {note}",
                label,
                group_digits(rate.round() as u64),
                megabytes(rate)
            );
            line.trim_end().to_owned()
        };
        lines.push(row("raw loopback TCP, null sink", tcp, String::new()));
        lines.push(row("page-cache file append", page_cache, String::new()));
        let reserved = self.limits.page_cache_reserved.messages_per_second();
        lines.push(row(
            "page-cache append, space reserved ahead",
            reserved,
            format!("{} × without", ratio(reserved, page_cache)),
        ));
        let sync_note = |synced: &SyncRate| {
            synced.latency.map_or_else(String::new, |latency| {
                format!(
                    "{} syncs; fdatasync p50 {} µs, p99 {} µs, max {} µs",
                    synced.batches,
                    group_digits(latency.p50_us),
                    group_digits(latency.p99_us),
                    group_digits(latency.max_us)
                )
            })
        };
        lines.push(row(
            "write + fdatasync per batch",
            synced,
            sync_note(&self.limits.fdatasync_per_batch),
        ));
        lines.push(row(
            &format!("write + fdatasync per {MAX_IN_FLIGHT_IDEMPOTENT} batches"),
            self.limits
                .fdatasync_per_in_flight
                .rate
                .messages_per_second(),
            sync_note(&self.limits.fdatasync_per_in_flight),
        ));
        lines.push(row(
            "write + fdatasync per message",
            self.limits.fdatasync_per_message.rate.messages_per_second(),
            sync_note(&self.limits.fdatasync_per_message),
        ));
        lines.push(String::new());
        lines.push(format!(
            "  Sluice: embedded, tcp, 1 producer, 1 partition, fsync={}, batch_bytes={}, linger_ms={}",
            FsyncPolicy::default(),
            arguments.batch_bytes,
            DEFAULT_LINGER_MS
        ));
        let leader = self.produce_leader.messages_per_second();
        let durable = self.produce_durable.messages_per_second();
        let consume = self.consume.messages_per_second();
        let [tcp_leader, tcp_durable, tcp_consume] =
            self.tcp_before.map(|rate| rate.messages_per_second());
        let in_flight = self
            .limits
            .fdatasync_per_in_flight
            .rate
            .messages_per_second();
        let before =
            |tcp: f64| format!("raw TCP right before: {}", group_digits(tcp.round() as u64));
        lines.push(row(
            "produce acks=leader",
            leader,
            format!(
                "{} × raw TCP ({}), {} × page-cache append",
                ratio(leader, tcp_leader),
                before(tcp_leader),
                ratio(leader, page_cache)
            ),
        ));
        lines.push(row(
            "produce acks=durable",
            durable,
            format!(
                "{} × raw TCP ({}), {} × fdatasync per batch, {} × per {MAX_IN_FLIGHT_IDEMPOTENT} batches",
                ratio(durable, tcp_durable),
                before(tcp_durable),
                ratio(durable, synced),
                ratio(durable, in_flight)
            ),
        ));
        lines.push(row(
            "consume, group of 1",
            consume,
            format!(
                "{} × raw TCP ({}; filled with acks=leader)",
                ratio(consume, tcp_consume),
                before(tcp_consume)
            ),
        ));
        lines.push(String::new());
        lines.push(format!(
            "  {:<42}{:>10}{:>10}{:>10}{:>10}",
            format!(
                "latency (µs) at {} msgs/s for {} s",
                group_digits(LATENCY_RATE),
                arguments.latency_duration
            ),
            "p50",
            "p99",
            "p99.9",
            "max"
        ));
        let latency_row = |label: &str, latency: Option<LatencySummary>| match latency {
            Some(latency) => format!(
                "  {:<42}{:>10}{:>10}{:>10}{:>10}",
                label,
                group_digits(latency.p50_us),
                group_digits(latency.p99_us),
                group_digits(latency.p999_us),
                group_digits(latency.max_us)
            ),
            None => format!("  {label:<42}  no message arrived"),
        };
        lines.push(latency_row(
            "raw loopback TCP, 1 hop, 2 threads",
            Some(self.limits.tcp_latency),
        ));
        lines.push(latency_row(
            "Sluice produce→consume, acks=leader",
            self.latency.produce_to_consume,
        ));
        if let Some(sluice) = self.latency.produce_to_consume {
            let raw = self.limits.tcp_latency;
            lines.push(format!(
                "  {:<42}{:>10}{:>10}{:>10}",
                "Sluice ÷ raw TCP",
                ratio(sluice.p50_us as f64, raw.p50_us as f64),
                ratio(sluice.p99_us as f64, raw.p99_us as f64),
                ratio(sluice.p999_us as f64, raw.p999_us as f64)
            ));
        }
        lines.push(format!("  {}", self.limits.stalls.summary()));
        let mut table = lines.join("\n");
        table.push('\n');
        table
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tool::cli::DEFAULT_BATCH_BYTES;

    #[test]
    fn batches_hold_whole_frames() {
        const WRITE_BYTES: usize = DEFAULT_BATCH_BYTES as usize;
        let (batch, frames) = framed_batch(100, WRITE_BYTES);
        assert_eq!(frames as usize, WRITE_BYTES / 104);
        assert_eq!(batch.len(), frames as usize * 104);
        assert_eq!(&batch[..4], &100u32.to_be_bytes());
        assert_eq!(&batch[104..108], &100u32.to_be_bytes());
        // A message bigger than a write still gets one frame per batch.
        let (batch, frames) = framed_batch(WRITE_BYTES, WRITE_BYTES);
        assert_eq!((batch.len(), frames), (WRITE_BYTES + 4, 1));
    }

    #[test]
    fn the_null_sink_counts_every_frame() {
        for message_size in [8, 1_000, 600_000] {
            let rate = raw_tcp(message_size, DEFAULT_BATCH_BYTES as usize, 1_001).unwrap();
            assert_eq!(rate.messages, 1_001);
        }
    }

    #[test]
    fn the_latency_reader_times_every_message() {
        let latency = raw_tcp_latency(100, 2_000, Duration::from_millis(250)).unwrap();
        assert_eq!(latency.count, 500);
        assert!(latency.p50_us <= latency.p999_us && latency.p999_us <= latency.max_us);
        // Shorter than the stamp: sent with room for it.
        assert_eq!(
            raw_tcp_latency(1, 1_000, Duration::from_millis(10))
                .unwrap()
                .count,
            10
        );
    }

    #[test]
    fn appends_reserving_ahead_write_the_same_bytes_and_hold_space_past_them() {
        use std::os::unix::fs::MetadataExt;
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("append");
        let mut sink = ReservingAhead::new(&path).unwrap();
        write_frames(&mut sink, 100, 64 * 1024, 2_000).unwrap();
        let mut plain = Vec::new();
        write_frames(&mut plain, 100, 64 * 1024, 2_000).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), plain);
        let len = plain.len() as u64;
        assert!(
            sink.reserved >= len + 64 * 1024,
            "{} reserved",
            sink.reserved
        );
        assert!(std::fs::metadata(&path).unwrap().blocks() * 512 >= sink.reserved);
    }

    #[test]
    fn file_limits_write_what_they_say() {
        let directory = tempfile::tempdir().unwrap();
        for reserve_ahead in [false, true] {
            let append = page_cache_append(
                directory.path(),
                100,
                DEFAULT_BATCH_BYTES as usize,
                10_000,
                reserve_ahead,
            )
            .unwrap();
            assert_eq!(append.messages, 10_000);
        }
        let synced = fdatasync_per_batch(
            directory.path(),
            100_000,
            DEFAULT_BATCH_BYTES as usize,
            5,
            u64::MAX,
            1,
        )
        .unwrap();
        assert_eq!(synced.rate.messages, 5);
        assert_eq!(
            synced.batches, 3,
            "two 100 kB messages fit in a 256 KiB batch"
        );
        assert_eq!(synced.latency.unwrap().count, 3);
        let one_each =
            fdatasync_per_batch(directory.path(), 100, DEFAULT_BATCH_BYTES as usize, 4, 1, 1)
                .unwrap();
        assert_eq!((one_each.rate.messages, one_each.batches), (4, 4));
        // Three writes of a 100 kB message each per sync: 7 messages, 3 syncs (3, 3, 1).
        let grouped = fdatasync_per_batch(
            directory.path(),
            100_000,
            DEFAULT_BATCH_BYTES as usize,
            7,
            1,
            3,
        )
        .unwrap();
        assert_eq!((grouped.rate.messages, grouped.batches), (7, 3));
        assert_eq!(ratio(1.0, 4.0), "0.25");
        assert_eq!(ratio(1.0, 40.0), "0.025");
    }
}
