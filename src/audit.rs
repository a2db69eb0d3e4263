//! Tamper-evident audit log: one JSON object per line in `data_dir/audit.jsonl`.
//!
//! Owns: the record format, the hash chain and its verification. Every record carries
//! `seq` (consecutive), `prev` (the previous record's hash) and `hash`, the SHA-256 of the
//! record's own bytes up to the hash field. Any edit, deletion or reordering breaks the chain
//! at the first affected line; truncating the tail is caught by comparing with the chain head
//! that the lease store commits after each batch; what the store cannot restore at start-up is
//! written into the chain as a gap ([`GAP_EVENT`]). A rotated file starts from the last hash of
//! the file before it; [`verify_chain`] walks them all as one chain from record 0, so a
//! deleted start or a deleted file is caught as well.
//!
//! The writer only formats and appends ([`AuditWriter::push`], [`AuditWriter::write`]);
//! durability comes from the lease store, which commits each record in the same transaction
//! as the lease it describes and fsyncs the file in the background (see `lease::store`).
//!
//! Records never contain key material or whole tokens: only ids, names and reasons.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ring::digest;
use serde_json::{Map, Value};

/// `prev` of the very first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// The record the daemon writes at start-up when the file lacks records the store had
/// committed (deleted, or edited so that they no longer continue the chain). The chain goes on
/// from what the file holds, so this record is what keeps the loss visible.
pub const GAP_EVENT: &str = "audit_gap";
const HASH_SUFFIX_LEN: usize = r#","hash":""}"#.len() + 64;

/// Who caused an event.
#[derive(Debug, Clone)]
pub enum Actor {
    /// A workload, as attested.
    Workload {
        /// uid.
        uid: u32,
        /// pid.
        pid: i32,
        /// Executable path, if known.
        exe: Option<String>,
    },
    /// An operator on the admin socket.
    Operator {
        /// uid.
        uid: u32,
        /// pid (of the process that connected), when known.
        pid: Option<i32>,
        /// The `[admin] allowed_gids` group that admitted it, when its uid alone did not
        /// (a group has many members: the uid says which one acted).
        gid: Option<u32>,
    },
    /// An agent authenticated by its JWT-SVID (HTTP endpoints).
    Agent {
        /// Its SPIFFE ID.
        spiffe_id: String,
    },
    /// Someone not authenticated who presented a token Tessera issued to `token_of`, refused
    /// (expired, revoked, another audience): whoever holds a copy, not necessarily its owner.
    Presenter {
        /// The SPIFFE ID the token was issued to.
        token_of: String,
    },
    /// The daemon itself (expiry, restore).
    Daemon,
}

impl Actor {
    // Writing to a Vec cannot fail, hence the ignored results.
    fn write_json(&self, b: &mut Vec<u8>) {
        use std::io::Write as _;
        match self {
            Self::Workload { uid, pid, exe } => {
                let _ = write!(b, r#"{{"uid":{uid},"pid":{pid},"exe":"#);
                let _ = serde_json::to_writer(&mut *b, exe);
                b.push(b'}');
            }
            Self::Operator { uid, pid, gid } => {
                let _ = write!(b, r#"{{"operator_uid":{uid}"#);
                if let Some(pid) = pid {
                    let _ = write!(b, r#","operator_pid":{pid}"#);
                }
                if let Some(gid) = gid {
                    let _ = write!(b, r#","operator_gid":{gid}"#);
                }
                b.push(b'}');
            }
            Self::Agent { spiffe_id } => {
                b.extend_from_slice(br#"{"agent":"#);
                let _ = serde_json::to_writer(&mut *b, spiffe_id);
                b.push(b'}');
            }
            Self::Presenter { token_of } => {
                b.extend_from_slice(br#"{"presented_token_of":"#);
                let _ = serde_json::to_writer(&mut *b, token_of);
                b.push(b'}');
            }
            Self::Daemon => b.extend_from_slice(br#""tesserad""#),
        }
    }

    /// Short form for lease records (`uid:0`, `tesserad`).
    pub fn label(&self) -> String {
        match self {
            Self::Workload { uid, pid, .. } => format!("workload uid:{uid} pid:{pid}"),
            Self::Operator { uid, gid: None, .. } => format!("operator uid:{uid}"),
            Self::Operator {
                uid, gid: Some(g), ..
            } => format!("operator uid:{uid} gid:{g}"),
            Self::Agent { spiffe_id } => format!("agent {spiffe_id}"),
            Self::Presenter { token_of } => format!("presenter of a token of {token_of}"),
            Self::Daemon => "tesserad".into(),
        }
    }
}

/// One event to record; the writer adds `seq`, `prev` and `hash`.
#[derive(Debug, Clone)]
pub struct Event {
    /// Unix time in milliseconds.
    pub at_ms: i64,
    /// `issue`, `deny`, `revoke`, `kill`, `restore`, `entry_create`, ...
    pub event: &'static str,
    /// Who.
    pub actor: Actor,
    /// Which identity.
    pub spiffe_id: Option<String>,
    /// Which lease.
    pub lease_id: Option<String>,
    /// Why.
    pub reason: Option<String>,
    /// Anything else worth keeping (kind, serial, counts, entry fields).
    pub detail: Map<String, Value>,
}

impl Event {
    /// An event happening now.
    pub fn now(event: &'static str, actor: Actor) -> Self {
        Self {
            at_ms: (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64,
            event,
            actor,
            spiffe_id: None,
            lease_id: None,
            reason: None,
            detail: Map::new(),
        }
    }

    /// Builder: identity.
    pub fn spiffe_id(mut self, id: impl Into<String>) -> Self {
        self.spiffe_id = Some(id.into());
        self
    }

    /// Builder: lease.
    pub fn lease(mut self, id: impl Into<String>) -> Self {
        self.lease_id = Some(id.into());
        self
    }

    /// Builder: reason.
    pub fn reason(mut self, r: impl Into<String>) -> Self {
        self.reason = Some(r.into());
        self
    }

    /// Builder: one detail field.
    pub fn detail(mut self, k: &str, v: impl Into<Value>) -> Self {
        self.detail.insert(k.into(), v.into());
        self
    }
}

fn sha256_hex(b: &[u8]) -> String {
    hex::encode(digest::digest(&digest::SHA256, b))
}

/// Appends records to the current audit file, keeping the chain.
#[derive(Debug)]
pub struct AuditWriter {
    path: PathBuf,
    // Shared with the store's background fsync.
    file: Arc<File>,
    size: u64,
    max_size: u64,
    seq: u64,
    prev: String,
    buf: Vec<u8>,
    /// Rotated away but the new file is not open yet (its open failed): retry the open.
    reopen: bool,
    /// An fdatasync of the file failed: a later one may succeed without the pages the kernel
    /// could not write, so nothing written since the last good sync can be trusted to be on
    /// disk (the store's writer stops; see [`AuditWriter::rewrite_unsynced`]).
    sync_failed: bool,
}

/// What [`AuditWriter::rewrite_unsynced`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unsynced {
    /// The file holds every record as the store committed it (or there were none).
    Intact,
    /// The file was cut where it differed, and this many records written again.
    Rewritten(usize),
    /// The records could not be compared with the file, for this reason; nothing changed.
    Unchecked(&'static str),
}

const DAMAGED_COPIES: &str =
    "the store's copies differ from the file and are not whole records continuing the chain";

/// A point in the chain to roll back to ([`AuditWriter::mark`]).
#[derive(Debug)]
pub struct Mark {
    seq: u64,
    prev: String,
    len: usize,
}

/// Audit file errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuditError {
    /// I/O on the audit file.
    #[error("audit log {path}: {source}")]
    Io {
        /// File.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The last complete record does not parse: the file was damaged.
    #[error("audit log {0}: last record is not a valid audit record; run `tessera audit verify`")]
    Damaged(PathBuf),
}

/// Opens (or creates) the live audit file for appending: never through a symbolic link, 0600
/// even if it was made otherwise, and only a regular file with one name (a hard link planted
/// at its path would let whoever holds the other name rewrite history; a FIFO would swallow
/// it).
fn open_live(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let file = live_options().create(true).open(path)?;
    let m = file.metadata()?;
    if !m.is_file() || m.nlink() != 1 {
        return Err(std::io::Error::other(
            "not a regular file with a single link; refusing to write the audit log into it",
        ));
    }
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    Ok(file)
}

/// How the live file is opened: appended to, read back at start, created 0600, never through
/// a symbolic link.
fn live_options() -> OpenOptions {
    use std::os::unix::fs::OpenOptionsExt;
    let mut o = OpenOptions::new();
    o.read(true)
        .append(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW);
    o
}

impl AuditWriter {
    /// Opens (or creates, 0600) the audit file and continues its chain. A partial last line
    /// left by a crash mid-write is cut off: it was never acknowledged.
    pub fn open(path: &Path, max_size: u64) -> Result<Self, AuditError> {
        let io = |source| AuditError::Io {
            path: path.to_owned(),
            source,
        };
        let mut file = open_live(path).map_err(io)?;
        let (mut seq, mut prev, good_len) = last_record(&mut file)
            .map_err(io)?
            .ok_or_else(|| AuditError::Damaged(path.to_owned()))?;
        let len = file.metadata().map_err(io)?.len();
        if good_len < len {
            file.set_len(good_len).map_err(io)?;
            file.sync_data().map_err(io)?;
        }
        if good_len == 0 {
            // Empty after a rotation (a power loss can take the new file's first records):
            // the chain goes on from the newest rotated file, not from genesis.
            if let Some(rotated) = newest_rotated(path) {
                let mut f = File::open(&rotated).map_err(io)?;
                (seq, prev, _) = last_record(&mut f)
                    .map_err(io)?
                    .ok_or(AuditError::Damaged(rotated))?;
            }
        }
        Ok(Self {
            path: path.to_owned(),
            file: Arc::new(file),
            size: good_len,
            max_size,
            seq,
            prev,
            buf: Vec::with_capacity(1 << 16),
            reopen: false,
            sync_failed: false,
        })
    }

    /// Whether an fdatasync of the file has failed since it was opened.
    pub fn sync_failed(&self) -> bool {
        self.sync_failed
    }

    /// Makes the end of the live file hold exactly `rows`: records the store kept because no
    /// sync of them was confirmed, `(seq, line)` in order, ending before the head. Where the
    /// file differs from them (a hole left by a failed fdatasync whose pages the kernel
    /// dropped, then a crash or power loss), it is cut there and the store's records follow
    /// (with the usual checks of [`AuditWriter::push_recovered`]; the caller flushes).
    /// Rows it cannot compare (not all in the live file, not contiguous, or not whole records
    /// that continue the chain) change nothing, and say why.
    pub fn rewrite_unsynced(&mut self, rows: &[(u64, Vec<u8>)]) -> Result<Unsynced, AuditError> {
        let io = |source| AuditError::Io {
            path: self.path.clone(),
            source,
        };
        let Some(&(first, _)) = rows.first() else {
            return Ok(Unsynced::Intact);
        };
        // The rows the file should hold: from `first` to the head, without a gap (the store
        // lacking one the file ends with would cut it).
        let rows = &rows[..rows.partition_point(|(s, _)| *s < self.seq)];
        if first >= self.seq {
            return Ok(Unsynced::Intact);
        }
        if !self.buf.is_empty()
            || first + rows.len() as u64 != self.seq
            || rows
                .iter()
                .enumerate()
                .any(|(i, (s, _))| *s != first + i as u64)
        {
            return Ok(Unsynced::Unchecked(
                "the store's copies do not run without a gap to the file's last record",
            ));
        }
        // Where record `first` starts: the rows end where the file does (its last record is
        // the one before the head, and a hole keeps the length), so that many bytes back. The
        // record before it was synced before any failure, so it is intact: it gives the hash
        // to chain from (the genesis at the start of the first file).
        let bytes: u64 = rows.iter().map(|(_, l)| l.len() as u64 + 1).sum();
        let Some(start) = self.size.checked_sub(bytes) else {
            return Ok(Unsynced::Unchecked(
                "the live file is shorter than the records it should hold (a rotation since?)",
            ));
        };
        let mut file = File::open(&self.path).map_err(io)?;
        let prev = match start {
            0 if first == 0 => GENESIS.to_owned(),
            0 => {
                return Ok(Unsynced::Unchecked(
                    "the record before them is in a rotated file",
                ));
            }
            _ => match record_ending_at(&mut file, start).map_err(io)? {
                Some((s, hash)) if s + 1 == first => hash,
                _ => {
                    return Ok(Unsynced::Unchecked(
                        "the record before them is not where they put it (a rotation since?)",
                    ));
                }
            },
        };
        let mut on_disk = Vec::new();
        file.seek(SeekFrom::Start(start)).map_err(io)?;
        file.read_to_end(&mut on_disk).map_err(io)?;
        // The first row whose line the file does not hold as it is, at its place.
        let mut at = 0usize;
        let mut k = 0usize;
        for (_, line) in rows {
            let end = at + line.len();
            if on_disk.get(at..end) != Some(line.as_slice()) || on_disk.get(end) != Some(&b'\n') {
                break;
            }
            at = end + 1;
            k += 1;
        }
        if k == rows.len() {
            return Ok(Unsynced::Intact);
        }
        // The store's rows from there must be whole records that continue the chain, or the
        // file (whose records may be the intact ones) is left as it is for the checks that
        // follow: nothing is cut for a row that could not replace it.
        let base = match k {
            0 => prev,
            _ => match check_record(&rows[k - 1].1) {
                Ok(c) => c.hash,
                Err(_) => return Ok(Unsynced::Unchecked(DAMAGED_COPIES)),
            },
        };
        let mut chain = base.clone();
        for (seq, line) in &rows[k..] {
            match check_record(line) {
                Ok(c) if c.seq == *seq && c.prev == chain => chain = c.hash,
                _ => return Ok(Unsynced::Unchecked(DAMAGED_COPIES)),
            }
        }
        let cut = start + at as u64;
        self.file.set_len(cut).map_err(io)?;
        self.size = cut;
        self.seq = first + k as u64;
        self.prev = base;
        let mut n = 0;
        for (_, line) in &rows[k..] {
            if self.push_recovered(line).is_err() {
                break;
            }
            n += 1;
        }
        Ok(Unsynced::Rewritten(n))
    }

    /// The chain head: next sequence number and the last hash.
    pub fn head(&self) -> (u64, &str) {
        (self.seq, &self.prev)
    }

    /// The live file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where the chain stands, for [`AuditWriter::rollback`].
    pub fn mark(&self) -> Mark {
        Mark {
            seq: self.seq,
            prev: self.prev.clone(),
            len: self.buf.len(),
        }
    }

    /// Drops the records pushed since `m` (not yet written): their transaction did not
    /// commit, so they describe things that did not happen.
    pub fn rollback(&mut self, m: Mark) {
        self.buf.truncate(m.len);
        self.seq = m.seq;
        self.prev = m.prev;
    }

    /// Formats `ev` as the next record into the pending buffer and returns that record (without
    /// its newline).
    pub fn push(&mut self, ev: &Event) -> &[u8] {
        // Written straight into the buffer: building a serde_json::Value first cost the store
        // thread a fifth of its time.
        let ts = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ev.at_ms) * 1_000_000)
            .ok()
            .and_then(|t| {
                t.format(&time::format_description::well_known::Rfc3339)
                    .ok()
            })
            .unwrap_or_default();
        let start = self.buf.len();
        let b = &mut self.buf;
        let field = |b: &mut Vec<u8>, key: &str, v: &str| {
            b.extend_from_slice(b",\"");
            b.extend_from_slice(key.as_bytes());
            b.extend_from_slice(b"\":");
            // Strings only: serializing one to a Vec cannot fail.
            let _ = serde_json::to_writer(&mut *b, v);
        };
        b.extend_from_slice(b"{\"seq\":");
        b.extend_from_slice(self.seq.to_string().as_bytes());
        field(b, "time", &ts);
        field(b, "event", ev.event);
        b.extend_from_slice(b",\"actor\":");
        ev.actor.write_json(b);
        for (key, v) in [
            ("spiffe_id", &ev.spiffe_id),
            ("lease_id", &ev.lease_id),
            ("reason", &ev.reason),
        ] {
            if let Some(v) = v {
                field(b, key, v);
            }
        }
        if !ev.detail.is_empty() {
            b.extend_from_slice(b",\"detail\":");
            let _ = serde_json::to_writer(&mut *b, &ev.detail);
        }
        field(b, "prev", &self.prev);
        // The hash covers the record as a complete object, before the hash field is added.
        let mut ctx = digest::Context::new(&digest::SHA256);
        ctx.update(&b[start..]);
        ctx.update(b"}");
        let hash = hex::encode(ctx.finish());
        b.extend_from_slice(br#","hash":""#);
        b.extend_from_slice(hash.as_bytes());
        b.extend_from_slice(b"\"}\n");
        self.seq += 1;
        self.prev = hash;
        &self.buf[start..self.buf.len() - 1]
    }

    /// Appends a record formatted earlier (one the store kept but the file lost in a crash)
    /// after checking that it is intact and continues this file's chain.
    pub fn push_recovered(&mut self, line: &[u8]) -> Result<(), String> {
        let Checked {
            seq, prev, hash, ..
        } = check_record(line)?;
        if seq != self.seq || prev != self.prev {
            return Err(format!(
                "record {seq} does not continue the file, which ends before record {}",
                self.seq
            ));
        }
        self.buf.extend_from_slice(line);
        self.buf.push(b'\n');
        self.seq += 1;
        self.prev = hash;
        Ok(())
    }

    /// The file being appended to, for syncing it off the writer's thread. A rotation replaces
    /// it, after syncing the old one.
    pub fn file(&self) -> Arc<File> {
        Arc::clone(&self.file)
    }

    /// Writes the pending records and makes them durable (fdatasync).
    pub fn flush(&mut self) -> Result<(), AuditError> {
        self.write()?;
        // With nothing to write too: at a stop, the store drops its copies of what is synced.
        self.check_replaced()?;
        self.file.sync_data().map_err(|source| {
            self.sync_failed = true;
            AuditError::Io {
                path: self.path.clone(),
                source,
            }
        })
    }

    /// Appends the pending records without waiting for the disk. Rotates first when the file is
    /// over its size limit: the full file is synced before it is renamed, and the new file
    /// continues the same chain. On failure the records stay pending and a partial write is
    /// cut off, so a retry appends whole lines.
    pub fn write(&mut self) -> Result<(), AuditError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let io = |p: &Path| {
            let p = p.to_owned();
            move |source| AuditError::Io { path: p, source }
        };
        // The live name no longer names the file written so far (`sed -i`, an editor, a
        // rotation by another tool, `rm`): records appended to it would go to a file nobody
        // can find, and the store would drop its copies once they were synced.
        self.check_replaced()?;
        // Someone else wrote to or cut the live file: records appended now would be glued to
        // their bytes (and the next start would refuse the file) or continue a chain whose
        // records they removed. The changed file is moved aside as it is, among the chain's
        // files, where `tessera audit verify` reports the change; the chain goes on in a new
        // file. An emptied file holds nothing to keep: the chain goes on in it. One fstat per
        // batch.
        let found = self.file.metadata().map_or(self.size, |m| m.len());
        let changed = !self.reopen && found != self.size;
        if changed {
            tracing::error!(
                file = %self.path.display(),
                written = self.size,
                found,
                "the audit log was changed by something other than tesserad; it is moved \
                 aside as it is, unless emptied (`tessera audit verify` reports the change), \
                 and the chain goes on in a new file"
            );
        }
        if changed && found == 0 {
            self.size = 0;
        }
        let foreign = changed && found > 0;
        if self.reopen
            || foreign
            || (self.size > 0 && self.size + self.buf.len() as u64 > self.max_size)
        {
            if !self.reopen {
                if let Err(e) = self.file.sync_data() {
                    // Retried, it could succeed without what it failed to write.
                    self.sync_failed = true;
                    return Err(io(&self.path)(e));
                }
                let stamp = time::OffsetDateTime::now_utc().unix_timestamp_nanos();
                let rotated = self.path.with_extension(format!("{stamp}.jsonl"));
                std::fs::rename(&self.path, &rotated).map_err(io(&self.path))?;
                if foreign {
                    tracing::error!(file = %rotated.display(), "the changed audit log was moved aside");
                }
                // Renamed: from here a failure retries the open, not the rename (the live
                // name is free now, and renaming it again would fail for good).
                self.reopen = true;
            }
            let file = open_live(&self.path).map_err(io(&self.path))?;
            // The rename and the new name must be durable before records in the new file
            // count as synced (and the store drops its copies of them).
            if let Some(dir) = self.path.parent() {
                File::open(dir)
                    .and_then(|d| d.sync_all())
                    .map_err(io(dir))?;
            }
            self.file = Arc::new(file);
            self.size = 0;
            self.reopen = false;
        }
        if let Err(e) = (&*self.file).write_all(&self.buf) {
            let _ = self.file.set_len(self.size);
            return Err(io(&self.path)(e));
        }
        self.size += self.buf.len() as u64;
        self.buf.clear();
        Ok(())
    }

    /// Whether the live name now names another file than the one written, or nothing.
    fn replaced(&self) -> bool {
        use std::os::unix::fs::MetadataExt;
        match (self.file.metadata(), std::fs::symlink_metadata(&self.path)) {
            (Ok(f), Ok(p)) => (f.dev(), f.ino()) != (p.dev(), p.ino()),
            (Ok(_), Err(e)) => e.kind() == std::io::ErrorKind::NotFound,
            _ => false,
        }
    }

    /// After [`Self::replaced`]: moves what the live name holds aside (a file with anything
    /// in it is kept, as a rotated file of the chain), and puts a copy of the file written so
    /// far, synced, under the live name in its place.
    fn put_back(&mut self) -> std::io::Result<()> {
        // The copy is made under a name outside the chain, synced, and only then renamed
        // into place: a failure (a full disk: the unlinked original keeps its blocks) leaves
        // the live name as it was, and the next batch tries again.
        let stamp = time::OffsetDateTime::now_utc().unix_timestamp_nanos();
        let tmp = self.path.with_extension(format!("{stamp}.putback"));
        let made = (|| {
            let mut copy = live_options().create_new(true).open(&tmp)?;
            let mut ours = &*self.file;
            ours.seek(SeekFrom::Start(0))?;
            let mut copied = std::io::copy(&mut ours.take(self.size), &mut copy)?;
            if copied < self.size {
                // Cut before it was replaced: whole records only. The chain then breaks
                // where they went, which `audit verify` reports.
                let whole = last_newline_end(&copy, copied)?;
                copy.set_len(whole)?;
                tracing::error!(
                    written = self.size,
                    found = copied,
                    "the audit log tesserad wrote had been cut before it was replaced; what \
                     is left of it is put back"
                );
                copied = whole;
            }
            copy.sync_all()?;
            Ok::<_, std::io::Error>((copy, copied))
        })();
        let (copy, copied) = match made {
            Ok(c) => c,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        };
        // What the live name holds now is kept, outside the chain (the chain is the file put
        // back): `<stem>.<stamp>.foreign.jsonl`.
        if let Ok(m) = std::fs::symlink_metadata(&self.path) {
            if m.is_file() && m.len() > 0 {
                let aside = self.path.with_extension(format!("{stamp}.foreign.jsonl"));
                std::fs::rename(&self.path, &aside)?;
                tracing::error!(file = %aside.display(), "the file that replaced the audit log is kept");
            } else {
                std::fs::remove_file(&self.path)?;
            }
        }
        std::fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent() {
            File::open(dir)?.sync_all()?;
        }
        self.file = Arc::new(copy);
        self.size = copied;
        Ok(())
    }

    /// Puts the file written so far back under the live name if something else replaced or
    /// removed it ([`Self::replaced`]).
    fn check_replaced(&mut self) -> Result<(), AuditError> {
        if self.reopen || !self.replaced() {
            return Ok(());
        }
        tracing::error!(
            file = %self.path.display(),
            "the audit log was replaced or removed by something other than tesserad; the file \
             tesserad wrote is put back under the live name"
        );
        self.put_back().map_err(|source| AuditError::Io {
            path: self.path.clone(),
            source,
        })
    }
}

/// The length of `file`'s first `len` bytes up to and including their last newline.
fn last_newline_end(file: &File, len: u64) -> std::io::Result<u64> {
    use std::os::unix::fs::FileExt;
    let mut end = len;
    let mut buf = [0u8; 4096];
    while end > 0 {
        let start = end.saturating_sub(buf.len() as u64);
        let chunk = &mut buf[..(end - start) as usize];
        file.read_exact_at(chunk, start)?;
        if let Some(i) = chunk.iter().rposition(|&b| b == b'\n') {
            return Ok(start + i as u64 + 1);
        }
        end = start;
    }
    Ok(0)
}

/// The files [`AuditWriter::write`] rotated `path` to (`<stem>.<unix nanos>.jsonl`), oldest
/// first.
fn rotated_files(path: &Path) -> Vec<PathBuf> {
    let (Some(stem), Some(dir)) = (path.file_stem().and_then(|s| s.to_str()), path.parent()) else {
        return Vec::new();
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let v: Vec<(i128, String)> = entries
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            let stamp: i128 = name
                .strip_prefix(stem)?
                .strip_prefix('.')?
                .strip_suffix(".jsonl")?
                .parse()
                .ok()?;
            Some((stamp, name))
        })
        .collect();
    // In chain order, by the first record each holds: the stamp is the wall clock at the
    // rotation, and a clock set back made a newer file sort before older ones (`audit
    // verify` then called an intact chain cut, and a start could continue from the wrong
    // file). The stamp only breaks ties (files with no readable first record).
    let mut v: Vec<(u64, i128, String)> = v
        .into_iter()
        .map(|(stamp, name)| {
            let first = first_seq(&path.with_file_name(&name)).unwrap_or(u64::MAX);
            (first, stamp, name)
        })
        .collect();
    v.sort();
    v.into_iter()
        .map(|(_, _, n)| path.with_file_name(n))
        .collect()
}

/// The `seq` of the first record in `path`.
fn first_seq(path: &Path) -> Option<u64> {
    let mut line = Vec::new();
    BufReader::new(File::open(path).ok()?)
        .read_until(b'\n', &mut line)
        .ok()?;
    parse_head(line.strip_suffix(b"\n").unwrap_or(&line)).map(|(seq, _)| seq)
}

/// The newest file [`AuditWriter::write`] rotated `path` to that holds a record: a file
/// moved aside after someone else changed it may begin with anything.
fn newest_rotated(path: &Path) -> Option<PathBuf> {
    rotated_files(path)
        .into_iter()
        .rev()
        .find(|p| first_seq(p).is_some())
}

/// The files of `current`'s chain in chain order: the rotated files, then `current`.
pub fn chain_files(current: &Path) -> Vec<PathBuf> {
    let mut v = rotated_files(current);
    v.push(current.to_owned());
    v
}

/// The hash of record `seq` in `current`'s chain, looked for from the newest file back.
/// For start-up, when the file holds more records than the store recorded.
pub fn hash_of(current: &Path, seq: u64) -> Option<String> {
    for path in chain_files(current).iter().rev() {
        let file = File::open(path).ok()?;
        let mut first = true;
        for line in BufReader::new(file).split(b'\n') {
            let c = check_record(&line.ok()?).ok()?;
            if c.seq == seq {
                return Some(c.hash);
            }
            if first && c.seq > seq {
                break; // in an older file
            }
            first = false;
        }
    }
    None
}

/// The events of the records numbered `from` and later in `current`'s chain, by name and
/// count, and the files holding them, read from the newest file back. For start-up, when the
/// log holds records the store never committed: what a store older than the log would lose.
pub fn events_from(current: &Path, from: u64) -> (BTreeMap<String, u64>, Vec<PathBuf>) {
    let mut events = BTreeMap::new();
    let mut files = Vec::new();
    for path in chain_files(current).iter().rev() {
        let Ok(file) = File::open(path) else { continue };
        let (mut reached, mut holds) = (false, false);
        for line in BufReader::new(file).split(b'\n') {
            let Ok(c) = line
                .map_err(|e| e.to_string())
                .and_then(|l| check_record(&l))
            else {
                continue;
            };
            reached |= c.seq <= from;
            if c.seq >= from {
                *events.entry(c.event).or_default() += 1;
                holds = true;
            }
        }
        if holds {
            files.push(path.clone());
        }
        if reached {
            break;
        }
    }
    files.reverse();
    (events, files)
}

/// The record whose line ends just before byte `at` of `file`: `(seq, hash)`, if that line is
/// whole and a record.
fn record_ending_at(file: &mut File, at: u64) -> std::io::Result<Option<(u64, String)>> {
    // A record is a few hundred bytes; an audit line is never near this long.
    let from = at.saturating_sub(64 * 1024);
    let mut window = vec![0u8; (at - from) as usize];
    file.seek(SeekFrom::Start(from))?;
    file.read_exact(&mut window)?;
    let Some(b'\n') = window.last() else {
        return Ok(None);
    };
    let body = &window[..window.len() - 1];
    let line = match body.iter().rposition(|b| *b == b'\n') {
        Some(i) => &body[i + 1..],
        None if from == 0 => body,
        None => return Ok(None),
    };
    Ok(parse_head(line))
}

/// Reads the last complete line: `(next seq, its hash, byte length up to and including it)`.
/// An empty file gives `(0, GENESIS, 0)`. `None` if the last complete line is not a record.
fn last_record(file: &mut File) -> std::io::Result<Option<(u64, String, u64)>> {
    let len = file.metadata()?.len();
    if len == 0 {
        return Ok(Some((0, GENESIS.into(), 0)));
    }
    // Read backwards in chunks until we hold the last complete line.
    let mut tail = Vec::new();
    let mut pos = len;
    loop {
        let step = (64 * 1024u64).min(pos);
        pos -= step;
        let mut chunk = vec![0u8; step as usize];
        file.seek(SeekFrom::Start(pos))?;
        file.read_exact(&mut chunk)?;
        chunk.extend_from_slice(&tail);
        tail = chunk;
        // Last newline = end of the last complete line.
        if let Some(end) = tail.iter().rposition(|b| *b == b'\n') {
            let start = tail[..end].iter().rposition(|b| *b == b'\n').map(|i| i + 1);
            if start.is_some() || pos == 0 {
                let line = &tail[start.unwrap_or(0)..end];
                let good_len = pos + end as u64 + 1;
                return Ok(parse_head(line).map(|(seq, hash)| (seq + 1, hash, good_len)));
            }
        } else if pos == 0 {
            // Not a single complete line: everything is a torn first write.
            return Ok(Some((0, GENESIS.into(), 0)));
        }
    }
}

fn parse_head(line: &[u8]) -> Option<(u64, String)> {
    let v: Value = serde_json::from_slice(line).ok()?;
    Some((v.get("seq")?.as_u64()?, v.get("hash")?.as_str()?.to_owned()))
}

/// Why verification failed: the file, its first bad line (1-based) and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{}: {why}", file.display(), if *line == 0 { String::new() } else { format!(": line {line}") })]
pub struct VerifyError {
    /// The file.
    pub file: PathBuf,
    /// 1-based line number (0 when the problem is the file as a whole).
    pub line: u64,
    /// What is wrong.
    pub why: String,
    /// When the tail is missing: the first missing `seq`.
    pub missing_from: Option<u64>,
}

/// Summary of a good file or chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// Files checked, in chain order.
    pub files: Vec<PathBuf>,
    /// Records checked.
    pub records: u64,
    /// Hash of the last record.
    pub head: String,
    /// `seq` of the last record.
    pub last_seq: Option<u64>,
    /// `seq`s of the [`GAP_EVENT`] records: the chain is intact, but the daemon found records
    /// missing from it when it started.
    pub gaps: Vec<u64>,
    /// The live file ended in a line still being written; it was not checked.
    pub unfinished_tail: bool,
}

impl Verified {
    /// The records (first and last `seq`) after the `head_seq` records the store has
    /// committed, other than [`GAP_EVENT`] records: none of them was written by tesserad,
    /// which commits every record to its store before appending it to the file (a failed
    /// commit's records never reach the file). The exception is the gap record, appended
    /// at start before the commit that records it. `head_seq` must be read after the walk,
    /// or records appended meanwhile would count.
    pub fn past_head(&self, head_seq: u64) -> Option<(u64, u64)> {
        let last = self.last_seq?;
        (head_seq..=last)
            .find(|s| !self.gaps.contains(s))
            .map(|first| (first, last))
    }
}

/// What [`check_record`] reads from a record.
struct Checked {
    seq: u64,
    prev: String,
    hash: String,
    event: String,
}

/// Checks one record on its own: complete, its hash matching its contents.
fn check_record(line: &[u8]) -> Result<Checked, String> {
    if line.len() < HASH_SUFFIX_LEN + 2 || !line.ends_with(b"\"}") {
        return Err("not a complete audit record".into());
    }
    let hash_start = line.len() - 2 - 64;
    let claimed = std::str::from_utf8(&line[hash_start..line.len() - 2])
        .map_err(|_| "hash is not text".to_owned())?;
    if &line[hash_start - 9..hash_start] != br#","hash":""# {
        return Err("hash field missing or not last".into());
    }
    let mut body = line[..hash_start - 9].to_vec();
    body.push(b'}');
    if sha256_hex(&body) != claimed {
        return Err("record was modified (hash does not match its contents)".into());
    }
    let v: Value = serde_json::from_slice(&body).map_err(|_| "not JSON".to_owned())?;
    let seq = v
        .get("seq")
        .and_then(Value::as_u64)
        .ok_or_else(|| "no seq".to_owned())?;
    let prev = v
        .get("prev")
        .and_then(Value::as_str)
        .ok_or_else(|| "no prev".to_owned())?;
    let event = v.get("event").and_then(Value::as_str).unwrap_or_default();
    Ok(Checked {
        seq,
        prev: prev.to_owned(),
        hash: claimed.to_owned(),
        event: event.to_owned(),
    })
}

/// Verifies a file on its own: every record, and the links between them. `expected_head`
/// (next seq and last hash recorded by the store) also catches a truncated tail. Nothing
/// anchors the file's first record: use [`verify_chain`] to check a whole log.
pub fn verify(path: &Path, expected_head: Option<(u64, &str)>) -> Result<Verified, VerifyError> {
    let mut walk = Walk {
        watch_seq: expected_head.and_then(|(s, _)| s.checked_sub(1)),
        ..Walk::default()
    };
    walk.file(path)?;
    walk.finish(path, expected_head)
}

/// Verifies the whole chain of `current` (the live file): every rotated file, oldest first,
/// then `current`, as one chain that must start at genesis (seq 0) and, with
/// `expected_head`, hold the record the store last committed. So deleting records anywhere,
/// the head of the first file or a whole rotated file included, is caught.
pub fn verify_chain(
    current: &Path,
    expected_head: Option<(u64, &str)>,
) -> Result<Verified, VerifyError> {
    let mut walk = Walk {
        from_genesis: true,
        watch_seq: expected_head.and_then(|(s, _)| s.checked_sub(1)),
        ..Walk::default()
    };
    for path in chain_files(current) {
        // The live file may end in a record the daemon is writing right now.
        walk.live = path == current;
        walk.file(&path)?;
    }
    walk.finish(current, expected_head)
}

/// The state of a verification as it walks records across files.
#[derive(Default)]
struct Walk {
    /// The first record must be seq 0 with prev [`GENESIS`].
    from_genesis: bool,
    prev: Option<String>,
    next_seq: Option<u64>,
    records: u64,
    files: Vec<PathBuf>,
    /// Lines in the last file walked.
    lines: u64,
    gaps: Vec<u64>,
    /// The record whose hash the tail check needs (the last one the store committed).
    watch_seq: Option<u64>,
    watched: Option<String>,
    /// The file being walked is the live one.
    live: bool,
    /// The live file ended in an unfinished line, left out.
    unfinished_tail: bool,
}

impl Walk {
    fn file(&mut self, path: &Path) -> Result<(), VerifyError> {
        let cannot = |e: std::io::Error| VerifyError {
            file: path.to_owned(),
            line: 0,
            why: format!("cannot open: {e}"),
            missing_from: None,
        };
        let mut file = File::open(path).map_err(cannot)?;
        // In the live file, a last line without its newline is being written (or was torn
        // by a crash, which the daemon cuts at start): it is left out, not called bad.
        // (`last_record` finds where the last complete line ends, as the writer does at
        // open; a last complete line that is no record is left for the walk to report.)
        let len = if self.live {
            let total = file.metadata().map_err(cannot)?.len();
            let complete = last_record(&mut file)
                .map_err(cannot)?
                .map_or(total, |(_, _, good_len)| good_len);
            file.seek(SeekFrom::Start(0)).map_err(cannot)?;
            self.unfinished_tail |= complete < total;
            complete
        } else {
            u64::MAX
        };
        self.files.push(path.to_owned());
        self.lines = 0;
        let mut n = 0u64;
        for line in BufReader::new(file.take(len)).split(b'\n') {
            n += 1;
            let bad = |why: String| VerifyError {
                file: path.to_owned(),
                line: n,
                why,
                missing_from: None,
            };
            let line = line.map_err(|e| bad(format!("read error: {e}")))?;
            let Checked {
                seq,
                prev: rec_prev,
                hash: claimed,
                event,
            } = check_record(&line).map_err(bad)?;
            if event == GAP_EVENT {
                self.gaps.push(seq);
            }
            if self.prev.is_none() && self.from_genesis && (seq != 0 || rec_prev != GENESIS) {
                return Err(bad(format!(
                    "the chain starts at record {seq}, not at the first record (0): records before it were deleted, or whole rotated files"
                )));
            }
            if let Some(p) = &self.prev
                && &rec_prev != p
            {
                return Err(bad("chain broken: prev does not match the previous record (a record was removed, inserted or reordered)".into()));
            }
            if let Some(s) = self.next_seq
                && seq != s
            {
                return Err(bad(format!("sequence jumps from {} to {seq}", s - 1)));
            }
            self.next_seq = Some(seq + 1);
            self.records += 1;
            self.lines = n;
            if self.watch_seq == Some(seq) {
                self.watched = Some(claimed.clone());
            }
            self.prev = Some(claimed);
        }
        Ok(())
    }

    /// Compares the end of the walk with the head the store recorded.
    fn finish(
        self,
        current: &Path,
        expected_head: Option<(u64, &str)>,
    ) -> Result<Verified, VerifyError> {
        if let Some((head_seq, head_hash)) = expected_head {
            let have = self.next_seq.unwrap_or(0);
            if have < head_seq {
                return Err(VerifyError {
                    file: current.to_owned(),
                    line: self.lines + 1,
                    why: format!(
                        "file ends at record {have} but the store recorded {head_seq} records: the tail was deleted"
                    ),
                    missing_from: Some(have),
                });
            }
            // The record the store last committed must be in the chain as it was, not a
            // rewritten history that merely grew past it. Records after it are checked by
            // [`Verified::past_head`] against the head read again after the walk: the daemon
            // may have committed and appended more while this read.
            // (`watched` is the record at `head_seq - 1`, so `head_seq` is at least 1.)
            if self.watched.as_deref().is_some_and(|h| h != head_hash) {
                return Err(VerifyError {
                    file: current.to_owned(),
                    line: 0,
                    why: format!(
                        "record {} differs from the one the store recorded: records up to it were replaced",
                        head_seq - 1
                    ),
                    missing_from: None,
                });
            }
        }
        Ok(Verified {
            files: self.files,
            records: self.records,
            head: self.prev.unwrap_or_else(|| GENESIS.into()),
            last_seq: self.next_seq.map(|s| s - 1),
            gaps: self.gaps,
            unfinished_tail: self.unfinished_tail,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, n: usize) -> PathBuf {
        let p = dir.join("audit.jsonl");
        let mut w = AuditWriter::open(&p, u64::MAX).unwrap();
        for i in 0..n {
            w.push(
                &Event::now(
                    "issue",
                    Actor::Workload {
                        uid: 1,
                        pid: i as i32,
                        exe: Some("/bin/x".into()),
                    },
                )
                .spiffe_id("spiffe://td/a")
                .lease(format!("l{i}")),
            );
        }
        w.flush().unwrap();
        p
    }

    fn lines(p: &Path) -> Vec<String> {
        std::fs::read_to_string(p)
            .unwrap()
            .lines()
            .map(String::from)
            .collect()
    }

    fn put(p: &Path, l: &[String]) {
        std::fs::write(p, l.iter().map(|x| format!("{x}\n")).collect::<String>()).unwrap();
    }

    #[test]
    fn the_file_is_never_opened_through_a_link_and_is_kept_private() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let target = d.path().join("elsewhere.jsonl");
        std::fs::write(&target, "").unwrap();
        let link = d.path().join("audit.jsonl");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(AuditWriter::open(&link, u64::MAX).is_err());
        std::fs::remove_file(&link).unwrap();
        std::fs::write(&link, "").unwrap();
        std::fs::set_permissions(&link, std::fs::Permissions::from_mode(0o644)).unwrap();
        drop(AuditWriter::open(&link, u64::MAX).unwrap());
        let mode = std::fs::metadata(&link).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // Nor into a file with a second name, or a FIFO.
        let other = d.path().join("other-name");
        std::fs::hard_link(&link, &other).unwrap();
        let Err(e) = AuditWriter::open(&link, u64::MAX) else {
            panic!("a file with a second name was taken");
        };
        assert!(e.to_string().contains("single link"), "{e}");
        std::fs::remove_file(&link).unwrap();
        nix::unistd::mkfifo(&link, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        assert!(AuditWriter::open(&link, u64::MAX).is_err());
    }

    #[test]
    fn a_line_being_written_at_the_end_of_the_live_file_is_left_out() {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), 3);
        let full = verify_chain(&p, None).unwrap();
        assert!(!full.unfinished_tail);
        // Half of a fourth record, as a reader can see it mid-append.
        let mut f = OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(br#"{"seq":3,"time":"2026"#).unwrap();
        let v = verify_chain(&p, Some((3, &full.head))).unwrap();
        assert_eq!((v.records, v.unfinished_tail), (3, true));
        // A rotated file, or one checked on its own, gets no such leniency.
        assert!(verify(&p, None).is_err());
    }

    #[test]
    fn a_chain_must_start_at_the_first_record() {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), 5);
        let l = lines(&p);
        put(&p, &l[2..]);
        // The rest of the file still links up...
        assert_eq!(verify(&p, None).unwrap().records, 3);
        // ...but as the whole log it has lost its start.
        let e = verify_chain(&p, None).unwrap_err();
        assert_eq!(e.line, 1);
        assert!(e.why.contains("starts at record 2"), "{e}");
    }

    #[test]
    fn rotated_files_verify_as_one_chain_and_a_missing_one_is_caught() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("audit.jsonl");
        // Small files: a rotation every few records.
        let mut w = AuditWriter::open(&p, 600).unwrap();
        for i in 0..12 {
            w.push(
                &Event::now(
                    "revoke",
                    Actor::Operator {
                        uid: 0,
                        pid: None,
                        gid: None,
                    },
                )
                .reason(format!("r{i}")),
            );
            w.flush().unwrap();
            // Distinct rotation stamps.
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        let head = (w.head().0, w.head().1.to_owned());
        drop(w);
        let files = chain_files(&p);
        assert!(files.len() >= 3, "{files:?}");
        let v = verify_chain(&p, Some((head.0, &head.1))).unwrap();
        assert_eq!((v.records, v.files.len()), (12, files.len()));
        assert_eq!(hash_of(&p, 11).as_deref(), Some(head.1.as_str()));
        assert!(hash_of(&p, 0).is_some());
        assert_eq!(hash_of(&p, 12), None);

        // The newest rotated file named by a clock that had been set back (review Z): still
        // in chain order, by the records it holds.
        let newest = files[files.len() - 2].clone();
        let back = p.with_extension("1000.jsonl");
        std::fs::rename(&newest, &back).unwrap();
        let reordered = chain_files(&p);
        assert_eq!(reordered[reordered.len() - 2], back, "{reordered:?}");
        verify_chain(&p, Some((head.0, &head.1))).unwrap();
        std::fs::rename(&back, &newest).unwrap();

        // A whole rotated file gone from the middle, then from the start.
        let middle = files[1].clone();
        let kept = std::fs::read(&middle).unwrap();
        std::fs::remove_file(&middle).unwrap();
        let e = verify_chain(&p, Some((head.0, &head.1))).unwrap_err();
        assert_eq!(e.file, files[2]);
        assert!(e.why.contains("chain broken"), "{e}");
        std::fs::write(&middle, kept).unwrap();
        std::fs::remove_file(&files[0]).unwrap();
        let e = verify_chain(&p, Some((head.0, &head.1))).unwrap_err();
        assert!(e.why.contains("not at the first record"), "{e}");
    }

    #[test]
    fn a_rewritten_chain_that_grew_past_the_recorded_head_is_caught() {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), 5);
        let head = verify(&p, None).unwrap().head;
        // Same length plus two: a valid chain of other records.
        std::fs::remove_file(&p).unwrap();
        let mut w = AuditWriter::open(&p, u64::MAX).unwrap();
        for _ in 0..7 {
            w.push(&Event::now("restore", Actor::Daemon));
        }
        w.flush().unwrap();
        assert!(verify_chain(&p, None).is_ok());
        let e = verify_chain(&p, Some((5, &head))).unwrap_err();
        assert!(e.why.contains("record 4 differs"), "{e}");
        // Records appended after the recorded head are fine.
        let sub = d.path().join("x");
        std::fs::create_dir(&sub).unwrap();
        let p2 = write(&sub, 5);
        let head2 = verify(&p2, None).unwrap().head;
        let mut w = AuditWriter::open(&p2, u64::MAX).unwrap();
        w.push(&Event::now("restore", Actor::Daemon));
        w.flush().unwrap();
        assert_eq!(verify_chain(&p2, Some((5, &head2))).unwrap().records, 6);
    }

    #[test]
    fn a_good_chain_verifies_and_continues_after_reopen() {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), 5);
        let mut w = AuditWriter::open(&p, u64::MAX).unwrap();
        assert_eq!(w.head().0, 5);
        w.push(
            &Event::now(
                "kill",
                Actor::Operator {
                    uid: 0,
                    pid: None,
                    gid: None,
                },
            )
            .reason("test"),
        );
        w.flush().unwrap();
        let v = verify(&p, Some((6, w.head().1))).unwrap();
        assert_eq!(v.records, 6);
        assert_eq!(v.last_seq, Some(5));
    }

    #[test]
    fn edits_deletions_and_reordering_name_the_first_bad_line() {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), 6);
        let orig = lines(&p);

        let mut edited = orig.clone();
        edited[2] = edited[2].replace("\"uid\":1", "\"uid\":0");
        put(&p, &edited);
        assert_eq!(verify(&p, None).unwrap_err().line, 3);

        let mut deleted = orig.clone();
        deleted.remove(3);
        put(&p, &deleted);
        assert_eq!(verify(&p, None).unwrap_err().line, 4);

        let mut swapped = orig.clone();
        swapped.swap(1, 2);
        put(&p, &swapped);
        assert_eq!(verify(&p, None).unwrap_err().line, 2);

        // Tail deletion is only visible against the recorded head.
        put(&p, &orig[..4]);
        assert!(verify(&p, None).is_ok());
        let head = orig[5].rsplit("\"hash\":\"").next().unwrap()[..64].to_owned();
        let e = verify(&p, Some((6, &head))).unwrap_err();
        assert!(e.why.contains("tail was deleted"), "{e}");
    }

    #[test]
    fn records_are_json_whatever_the_strings_hold() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("audit.jsonl");
        let mut w = AuditWriter::open(&p, u64::MAX).unwrap();
        let odd = "quote \" back \\ newline \n ctl \u{1} é 🔑 </script>";
        let actors = [
            Actor::Workload {
                uid: 7,
                pid: -1,
                exe: Some(odd.into()),
            },
            Actor::Workload {
                uid: 7,
                pid: 8,
                exe: None,
            },
            Actor::Operator {
                uid: 0,
                pid: None,
                gid: None,
            },
            Actor::Agent {
                spiffe_id: odd.into(),
            },
            Actor::Daemon,
        ];
        let want = [
            serde_json::json!({"uid": 7, "pid": -1, "exe": odd}),
            serde_json::json!({"uid": 7, "pid": 8, "exe": null}),
            serde_json::json!({"operator_uid": 0}),
            serde_json::json!({"agent": odd}),
            serde_json::json!("tesserad"),
        ];
        for a in actors {
            w.push(
                &Event::now("deny", a)
                    .spiffe_id(odd)
                    .lease(odd)
                    .reason(odd)
                    .detail(odd, odd)
                    .detail("n", 3),
            );
        }
        w.push(&Event::now("restore", Actor::Daemon));
        w.flush().unwrap();
        let v = verify(&p, Some((6, w.head().1))).unwrap();
        assert_eq!(v.records, 6);
        let recs: Vec<Value> = lines(&p)
            .iter()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        for (i, (r, a)) in recs.iter().zip(&want).enumerate() {
            assert_eq!(r["seq"], i as u64);
            assert_eq!(r["event"], "deny");
            assert_eq!(&r["actor"], a);
            for k in ["spiffe_id", "lease_id", "reason"] {
                assert_eq!(r[k], odd, "{k}");
            }
            assert_eq!(r["detail"][odd], odd);
            assert_eq!(r["detail"]["n"], 3);
            assert!(r["time"].as_str().unwrap().ends_with('Z'));
        }
        let last = recs[5].as_object().unwrap();
        let keys: Vec<&str> = last.keys().map(String::as_str).collect();
        assert_eq!(keys.len(), 6, "absent fields are left out: {keys:?}");
        assert_eq!(last["prev"], recs[4]["hash"]);
    }

    #[test]
    fn a_torn_last_line_is_cut_on_open() {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), 3);
        let mut f = OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(b"{\"seq\":3,\"time\":\"half").unwrap();
        drop(f);
        let w = AuditWriter::open(&p, u64::MAX).unwrap();
        assert_eq!(w.head().0, 3);
        assert!(verify(&p, None).is_ok());
    }

    /// A live file in a temporary directory with three records written to it.
    fn three_records_written() -> (tempfile::TempDir, PathBuf, AuditWriter) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("audit.jsonl");
        let mut w = AuditWriter::open(&p, u64::MAX).unwrap();
        for i in 0..3 {
            w.push(&Event::now("issue", Actor::Daemon).lease(format!("{i}")));
        }
        w.write().unwrap();
        (d, p, w)
    }

    #[test]
    fn a_live_file_changed_by_someone_else_is_moved_aside_not_written_onto() {
        let (_d, p, mut w) = three_records_written();
        // Stray bytes: before, the next record was glued onto them, and the next start
        // refused the file.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&p)
            .unwrap()
            .write_all(br#"{"seq":3,"ti"#)
            .unwrap();
        w.push(&Event::now("issue", Actor::Daemon).lease("3"));
        w.write().unwrap();
        let moved = newest_rotated(&p).expect("the changed file was moved aside");
        assert!(
            std::fs::read_to_string(&moved)
                .unwrap()
                .ends_with(r#"{"seq":3,"ti"#)
        );
        let live = verify(&p, None).unwrap();
        assert_eq!((live.records, live.last_seq), (1, Some(3)));
        let e = verify_chain(&p, Some((4, w.head().1))).unwrap_err();
        assert_eq!(e.file, moved, "{e}");
        drop(w);
        AuditWriter::open(&p, u64::MAX).expect("the daemon starts on what it wrote");

        // A cut tail: the new file's first record names the missing one as its predecessor,
        // at the file boundary.
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("audit.jsonl");
        let mut w = AuditWriter::open(&p, u64::MAX).unwrap();
        w.push(&Event::now("issue", Actor::Daemon).lease("0"));
        w.push(&Event::now("issue", Actor::Daemon).lease("1"));
        w.write().unwrap();
        let first = std::fs::read_to_string(&p).unwrap();
        std::fs::write(&p, first.lines().next().unwrap().to_owned() + "\n").unwrap();
        w.push(&Event::now("issue", Actor::Daemon).lease("2"));
        w.write().unwrap();
        assert_eq!(rotated_files(&p).len(), 1);
        let e = verify_chain(&p, None).unwrap_err();
        assert_eq!((e.file.as_path(), e.line), (p.as_path(), 1), "{e}");
    }

    #[test]
    fn a_live_file_replaced_or_removed_by_someone_else_is_put_back() {
        let (d, p, mut w) = three_records_written();
        let ours = std::fs::read_to_string(&p).unwrap();
        // `sed -i '$d'`: a new file with the last record cut, renamed over the live name.
        let edited: String = ours.lines().take(2).map(|l| format!("{l}\n")).collect();
        let tmp = d.path().join("sedXYZ");
        std::fs::write(&tmp, &edited).unwrap();
        std::fs::rename(&tmp, &p).unwrap();
        w.push(&Event::now("issue", Actor::Daemon).lease("3"));
        w.write().unwrap();
        let now = std::fs::read_to_string(&p).unwrap();
        assert!(
            now.starts_with(&ours),
            "the daemon's records are back under the live name"
        );
        assert_eq!(now.lines().count(), 4);
        // The edited file is kept outside the chain, which is whole again.
        assert!(rotated_files(&p).is_empty());
        let kept: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|f| f.to_string_lossy().ends_with(".foreign.jsonl"))
            .collect();
        assert_eq!(kept.len(), 1, "{kept:?}");
        assert_eq!(std::fs::read_to_string(&kept[0]).unwrap(), edited);
        verify_chain(&p, Some((4, w.head().1))).unwrap();

        // Removed, while idle: put back at the flush a stop makes, not only at the next
        // record.
        std::fs::remove_file(&p).unwrap();
        w.flush().unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), now);
        w.push(&Event::now("issue", Actor::Daemon).lease("4"));
        w.write().unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap().lines().count(), 5);
        verify_chain(&p, Some((5, w.head().1))).unwrap();

        // Cut, then replaced: what is left is put back, whole records only, and the chain
        // breaks where records went.
        let five = std::fs::read_to_string(&p).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(five.len() as u64 - 10)
            .unwrap();
        std::fs::rename(&p, d.path().join("elsewhere")).unwrap();
        w.push(&Event::now("issue", Actor::Daemon).lease("5"));
        w.write().unwrap();
        let after = std::fs::read_to_string(&p).unwrap();
        assert_eq!(
            after.lines().count(),
            5,
            "4 whole records put back, then the new one"
        );
        assert!(verify_chain(&p, None).is_err());
        assert!(
            !std::fs::read_dir(d.path()).unwrap().any(|e| e
                .unwrap()
                .path()
                .to_string_lossy()
                .ends_with(".putback")),
            "no copy left behind"
        );
        std::fs::write(&p, &five).unwrap();
        drop(w);
        let mut w = AuditWriter::open(&p, u64::MAX).unwrap();

        // Emptied in place (`copytruncate`): nothing moved aside, the chain goes on in it and
        // verify reports the records that went.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(0)
            .unwrap();
        w.push(&Event::now("issue", Actor::Daemon).lease("5"));
        w.write().unwrap();
        assert!(rotated_files(&p).is_empty());
        assert_eq!(std::fs::read_to_string(&p).unwrap().lines().count(), 1);
        assert!(verify_chain(&p, None).is_err());
    }

    #[test]
    fn rotation_starts_the_new_file_from_the_recorded_hash() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("audit.jsonl");
        let mut w = AuditWriter::open(&p, 600).unwrap();
        for i in 0..10 {
            w.push(&Event::now("issue", Actor::Daemon).lease(format!("{i}")));
            w.flush().unwrap();
        }
        let files: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert!(files.len() > 2, "{files:?}");
        for f in &files {
            verify(f, None).unwrap();
        }
        let v = verify(&p, Some((10, w.head().1))).unwrap();
        assert_eq!(v.last_seq, Some(9));

        // A power loss right after a rotation can leave the new file empty: reopening goes on
        // from the newest rotated file, so the store's records can still be appended.
        w.push(&Event::now("issue", Actor::Daemon).lease("10"));
        w.push(&Event::now("issue", Actor::Daemon).lease("11"));
        w.write().unwrap();
        let (seq, hash) = (w.head().0, w.head().1.to_owned());
        drop(w);
        let before = std::fs::read_to_string(&p).unwrap();
        assert!(before.contains(r#""seq":10"#), "{before}");
        let last_rotated = newest_rotated(&p).unwrap();
        std::fs::write(&p, "").unwrap();
        let w = AuditWriter::open(&p, 600).unwrap();
        let expect = std::fs::read_to_string(&last_rotated).unwrap();
        let last: Value = serde_json::from_str(expect.lines().last().unwrap()).unwrap();
        assert_eq!(w.head().0, last["seq"].as_u64().unwrap() + 1);
        assert_eq!(w.head().1, last["hash"].as_str().unwrap());
        assert!(seq > w.head().0 && hash != w.head().1);
    }
}
