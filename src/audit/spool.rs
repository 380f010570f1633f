//! The bounded queue of one HTTP audit sink: events wait here, in order,
//! until the receiver has acknowledged them. On disk (`spool_dir`): numbered
//! segment files of JSON lines and a cursor file naming the first line not
//! yet acknowledged, written with temp file + fsync + rename, so a restart
//! resumes where delivery stopped (the receiver may see the last batch
//! again: events carry ids for that). Without `spool_dir`: the same queue
//! in memory, lost at a restart.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// A segment file is closed and a new one started past this size.
const SEGMENT_BYTES: u64 = 4 << 20;
const CURSOR_FILE: &str = "cursor";

/// Where the first unacknowledged line is: segment number and byte offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Cursor {
    segment: u64,
    offset: u64,
}

/// Lines read from the spool and the cursor just after them.
#[derive(Debug, Default)]
pub struct Batch {
    /// The lines, without their newlines.
    pub lines: Vec<Vec<u8>>,
    /// Where the spool continues after them.
    pub next: Cursor,
    /// Bytes the lines took in the spool (newlines included).
    pub bytes: u64,
}

/// The queue of one sink.
#[derive(Debug)]
pub enum Spool {
    /// Lines in memory.
    Memory {
        /// The lines, oldest first.
        lines: VecDeque<Vec<u8>>,
        /// Their total size.
        bytes: u64,
    },
    /// Lines in segment files.
    Disk(DiskSpool),
}

impl Spool {
    /// An in-memory spool.
    pub fn memory() -> Spool {
        Spool::Memory {
            lines: VecDeque::new(),
            bytes: 0,
        }
    }

    /// Opens (or creates) the spool in `dir`, resuming at its cursor.
    pub fn open(dir: &Path) -> std::io::Result<Spool> {
        DiskSpool::open(dir).map(Spool::Disk)
    }

    /// Bytes waiting for delivery.
    pub fn bytes(&self) -> u64 {
        match self {
            Spool::Memory { bytes, .. } => *bytes,
            Spool::Disk(disk) => disk.pending,
        }
    }

    /// Appends one line (no newline inside).
    pub fn append(&mut self, line: &[u8]) -> std::io::Result<()> {
        match self {
            Spool::Memory { lines, bytes } => {
                *bytes = bytes.saturating_add(line.len() as u64 + 1);
                lines.push_back(line.to_vec());
                Ok(())
            }
            Spool::Disk(disk) => disk.append(line),
        }
    }

    /// Up to `max` of the oldest lines, not removed.
    pub fn peek(&mut self, max: usize) -> std::io::Result<Batch> {
        match self {
            Spool::Memory { lines, .. } => {
                let lines: Vec<Vec<u8>> = lines.iter().take(max).cloned().collect();
                let bytes = lines.iter().map(|l| l.len() as u64 + 1).sum();
                Ok(Batch {
                    next: Cursor {
                        segment: 0,
                        offset: lines.len() as u64,
                    },
                    lines,
                    bytes,
                })
            }
            Spool::Disk(disk) => disk.peek(max),
        }
    }

    /// Removes the lines of `batch` (acknowledged by the receiver).
    pub fn commit(&mut self, batch: &Batch) -> std::io::Result<()> {
        match self {
            Spool::Memory { lines, bytes } => {
                let n = usize::try_from(batch.next.offset).unwrap_or(usize::MAX);
                lines.drain(..n.min(lines.len()));
                *bytes = bytes.saturating_sub(batch.bytes);
                Ok(())
            }
            Spool::Disk(disk) => disk.commit(batch),
        }
    }
}

/// The on-disk spool.
#[derive(Debug)]
pub struct DiskSpool {
    dir: PathBuf,
    /// First unacknowledged line.
    cursor: Cursor,
    /// Segment being appended to, its file and its size.
    write_segment: u64,
    writer: File,
    write_size: u64,
    /// Bytes after the cursor.
    pending: u64,
}

fn segment_path(dir: &Path, segment: u64) -> PathBuf {
    dir.join(format!("{segment:020}.jsonl"))
}

fn segments(dir: &Path) -> std::io::Result<Vec<u64>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name();
        if let Some(n) = name
            .to_str()
            .and_then(|n| n.strip_suffix(".jsonl"))
            .and_then(|n| n.parse::<u64>().ok())
        {
            found.push(n);
        }
    }
    found.sort_unstable();
    Ok(found)
}

fn open_append(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(path)
}

impl DiskSpool {
    fn open(dir: &Path) -> std::io::Result<DiskSpool> {
        std::fs::create_dir_all(dir)?;
        let found = segments(dir)?;
        let saved = read_cursor(dir);
        let first = found.first().copied().unwrap_or(1);
        let cursor = match saved {
            Some(c) if found.contains(&c.segment) => c,
            _ => Cursor {
                segment: first,
                offset: 0,
            },
        };
        let write_segment = found.last().copied().unwrap_or(first).max(cursor.segment);
        let path = segment_path(dir, write_segment);
        // A line cut short by a crash is not an event: cut it off.
        let write_size = truncate_to_last_line(&path)?;
        let writer = open_append(&path)?;
        let mut pending = 0u64;
        for segment in found.iter().filter(|s| **s >= cursor.segment) {
            let len = std::fs::metadata(segment_path(dir, *segment))?.len();
            pending += if *segment == cursor.segment {
                len.saturating_sub(cursor.offset)
            } else {
                len
            };
        }
        Ok(DiskSpool {
            dir: dir.to_path_buf(),
            cursor,
            write_segment,
            writer,
            write_size,
            pending,
        })
    }

    fn append(&mut self, line: &[u8]) -> std::io::Result<()> {
        if self.write_size >= SEGMENT_BYTES {
            self.write_segment += 1;
            self.writer = open_append(&segment_path(&self.dir, self.write_segment))?;
            self.write_size = 0;
        }
        let mut bytes = Vec::with_capacity(line.len() + 1);
        bytes.extend_from_slice(line);
        bytes.push(b'\n');
        self.writer.write_all(&bytes)?;
        self.write_size += bytes.len() as u64;
        self.pending += bytes.len() as u64;
        Ok(())
    }

    fn peek(&mut self, max: usize) -> std::io::Result<Batch> {
        let mut batch = Batch {
            next: self.cursor,
            ..Batch::default()
        };
        while batch.lines.len() < max {
            let path = segment_path(&self.dir, batch.next.segment);
            let mut file = match File::open(&path) {
                Ok(file) => file,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                Err(e) => return Err(e),
            };
            file.seek(SeekFrom::Start(batch.next.offset))?;
            let mut reader = BufReader::new(file);
            let mut line = Vec::new();
            let mut at_end = false;
            while batch.lines.len() < max {
                line.clear();
                let n = reader.read_until(b'\n', &mut line)?;
                if n == 0 || line.last() != Some(&b'\n') {
                    at_end = true;
                    break;
                }
                batch.next.offset += n as u64;
                batch.bytes += n as u64;
                line.pop();
                if !line.is_empty() {
                    batch.lines.push(line.clone());
                }
            }
            if at_end && batch.next.segment < self.write_segment {
                batch.next = Cursor {
                    segment: batch.next.segment + 1,
                    offset: 0,
                };
            } else {
                break;
            }
        }
        Ok(batch)
    }

    fn commit(&mut self, batch: &Batch) -> std::io::Result<()> {
        write_cursor(&self.dir, batch.next)?;
        for segment in self.cursor.segment..batch.next.segment {
            let _ = std::fs::remove_file(segment_path(&self.dir, segment));
        }
        self.cursor = batch.next;
        self.pending = self.pending.saturating_sub(batch.bytes);
        Ok(())
    }
}

/// Truncates the file after its last newline; returns the new length.
fn truncate_to_last_line(path: &Path) -> std::io::Result<u64> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let keep = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    if keep < bytes.len() {
        OpenOptions::new()
            .write(true)
            .open(path)?
            .set_len(keep as u64)?;
    }
    Ok(keep as u64)
}

fn read_cursor(dir: &Path) -> Option<Cursor> {
    let text = std::fs::read_to_string(dir.join(CURSOR_FILE)).ok()?;
    let (segment, offset) = text.trim().split_once(' ')?;
    Some(Cursor {
        segment: segment.parse().ok()?,
        offset: offset.parse().ok()?,
    })
}

/// Temp file, fsync, rename: the cursor is the old one or the new one.
fn write_cursor(dir: &Path, cursor: Cursor) -> std::io::Result<()> {
    let tmp = dir.join(format!("{CURSOR_FILE}.tmp"));
    let mut file = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o640)
        .open(&tmp)?;
    writeln!(file, "{} {}", cursor.segment, cursor.offset)?;
    file.sync_all()?;
    std::fs::rename(&tmp, dir.join(CURSOR_FILE))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(spool: &mut Spool, max: usize) -> Vec<String> {
        let mut out = Vec::new();
        loop {
            let batch = spool.peek(max).unwrap();
            if batch.lines.is_empty() {
                return out;
            }
            out.extend(
                batch
                    .lines
                    .iter()
                    .map(|l| String::from_utf8(l.clone()).unwrap()),
            );
            spool.commit(&batch).unwrap();
        }
    }

    #[test]
    fn memory_spool_keeps_order_and_counts_bytes() {
        let mut spool = Spool::memory();
        for i in 0..5 {
            spool.append(format!("e{i}").as_bytes()).unwrap();
        }
        assert_eq!(spool.bytes(), 15);
        let first = spool.peek(2).unwrap();
        assert_eq!(first.lines, vec![b"e0".to_vec(), b"e1".to_vec()]);
        // Not committed: read again.
        assert_eq!(spool.peek(2).unwrap().lines, first.lines);
        spool.commit(&first).unwrap();
        assert_eq!(drain(&mut spool, 2), ["e2", "e3", "e4"]);
        assert_eq!(spool.bytes(), 0);
    }

    #[test]
    fn disk_spool_resumes_after_a_restart_at_its_cursor() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path()).unwrap();
        for i in 0..10 {
            spool.append(format!("event-{i}").as_bytes()).unwrap();
        }
        let batch = spool.peek(4).unwrap();
        spool.commit(&batch).unwrap();
        let unacked = spool.peek(3).unwrap();
        assert_eq!(unacked.lines.len(), 3);
        drop(spool);
        let mut again = Spool::open(dir.path()).unwrap();
        assert_eq!(again.bytes(), 6 * 8);
        let rest = drain(&mut again, 100);
        assert_eq!(
            rest,
            (4..10).map(|i| format!("event-{i}")).collect::<Vec<_>>()
        );
        assert_eq!(again.bytes(), 0);
    }

    #[test]
    fn disk_spool_crosses_segments_and_deletes_delivered_ones() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path()).unwrap();
        let line = vec![b'x'; 1 << 20];
        for _ in 0..9 {
            spool.append(&line).unwrap();
        }
        assert!(segments(dir.path()).unwrap().len() >= 2);
        assert_eq!(drain(&mut spool, 3).len(), 9);
        assert_eq!(
            segments(dir.path()).unwrap().len(),
            1,
            "delivered segments removed"
        );
        spool.append(b"after").unwrap();
        assert_eq!(drain(&mut spool, 3), ["after"]);
    }

    #[test]
    fn a_line_cut_by_a_crash_is_not_glued_to_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path()).unwrap();
        spool.append(b"whole").unwrap();
        drop(spool);
        let path = segment_path(dir.path(), 1);
        let mut file = open_append(&path).unwrap();
        file.write_all(b"{\"cut").unwrap();
        let mut spool = Spool::open(dir.path()).unwrap();
        spool.append(b"next").unwrap();
        assert_eq!(drain(&mut spool, 10), ["whole", "next"]);
    }
}
