//! The TLS 1.3 record layer of an established connection (RFC 8446,
//! section 5), run by this crate once rustls has done the handshake.
//!
//! rustls negotiates the session and hands over the traffic keys (its
//! "kernel connection" interface, made for kernel TLS). Each half of a
//! connection then owns its own direction: the sending half encrypts
//! records in place in one buffer and writes them, the receiving half
//! reads ciphertext into one buffer and decrypts it where it lies. Neither
//! half waits for the other, and page data is copied once on each side
//! instead of the three or four times a buffered session copies it.
//! rustls still derives the next keys when a key update is due.

use ring::aead::{AES_128_GCM, AES_256_GCM, Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};
use rustls::ConnectionTrafficSecrets;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// Where sealed records go: writes all the bytes it is given, or fails.
pub(crate) type Write<'a> = dyn FnMut(&[u8]) -> io::Result<()> + 'a;

/// Most plaintext one record carries.
pub(crate) const MAX_PLAINTEXT: usize = 1 << 14;
/// Most ciphertext one record may carry (RFC 8446, 5.2).
const MAX_CIPHERTEXT: usize = MAX_PLAINTEXT + 256;
const HEADER: usize = 5;
const TAG: usize = 16;
/// Records gathered before one socket write.
const WRITE_BATCH: usize = 256 << 10;
/// Ciphertext read from the socket at once, at most.
const READ_BUFFER: usize = 512 << 10;

const APPLICATION_DATA: u8 = 23;
const ALERT: u8 = 21;
const HANDSHAKE: u8 = 22;
const KEY_UPDATE: u8 = 24;
const NEW_SESSION_TICKET: u8 = 4;

/// Derives the next traffic keys of a connection (rustls's kernel
/// connection); shared by its two halves, used only at a key update.
pub(crate) trait NextKeys: Send {
    fn next_tx(&mut self) -> Result<ConnectionTrafficSecrets, rustls::Error>;
    fn next_rx(&mut self) -> Result<ConnectionTrafficSecrets, rustls::Error>;
}

impl<Data> NextKeys for rustls::kernel::KernelConnection<Data>
where
    rustls::kernel::KernelConnection<Data>: Send,
{
    fn next_tx(&mut self) -> Result<ConnectionTrafficSecrets, rustls::Error> {
        self.update_tx_secret().map(|(_, secrets)| secrets)
    }

    fn next_rx(&mut self) -> Result<ConnectionTrafficSecrets, rustls::Error> {
        self.update_rx_secret().map(|(_, secrets)| secrets)
    }
}

/// What the two halves of a connection share.
pub(crate) struct Shared {
    keys: Mutex<Box<dyn NextKeys>>,
    /// The peer updated its keys and asked this side to update its own.
    update_requested: AtomicBool,
}

impl Shared {
    pub(crate) fn new(keys: Box<dyn NextKeys>) -> Arc<Self> {
        Arc::new(Self {
            keys: Mutex::new(keys),
            update_requested: AtomicBool::new(false),
        })
    }

    fn next(&self, tx: bool) -> io::Result<ConnectionTrafficSecrets> {
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        if tx { keys.next_tx() } else { keys.next_rx() }.map_err(|e| invalid(format!("TLS key update: {e}")))
    }
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

/// One direction's key and record sequence number.
struct RecordKey {
    key: LessSafeKey,
    iv: [u8; 12],
    seq: u64,
    /// Records this key may protect (the suite's confidentiality limit).
    limit: u64,
}

impl RecordKey {
    fn new(secrets: &ConnectionTrafficSecrets, seq: u64) -> io::Result<Self> {
        let (algorithm, key, iv, limit) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&AES_128_GCM, key, iv, 1 << 24),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&AES_256_GCM, key, iv, 1 << 24),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => (&CHACHA20_POLY1305, key, iv, u64::MAX),
            _ => return Err(invalid("a TLS cipher this side does not support".into())),
        };
        let key = UnboundKey::new(algorithm, key.as_ref())
            .map_err(|_| invalid("TLS traffic key of the wrong size".into()))?;
        let iv: [u8; 12] = iv
            .as_ref()
            .try_into()
            .map_err(|_| invalid("TLS traffic IV of the wrong size".into()))?;
        Ok(Self {
            key: LessSafeKey::new(key),
            iv,
            seq,
            limit,
        })
    }

    /// The next record's nonce: the IV XOR the sequence number.
    fn nonce(&mut self) -> io::Result<Nonce> {
        let mut nonce = self.iv;
        for (byte, seq) in nonce[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *byte ^= seq;
        }
        self.seq = self
            .seq
            .checked_add(1)
            .ok_or_else(|| invalid("TLS record sequence number exhausted".into()))?;
        Ok(Nonce::assume_unique_for_key(nonce))
    }
}

/// The sending direction of a connection.
pub(crate) struct Sealer {
    key: RecordKey,
    shared: Arc<Shared>,
    /// Records not written yet.
    out: Vec<u8>,
    /// Where the record being filled starts in `out`.
    open: Option<usize>,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer")
            .field("seq", &self.key.seq)
            .finish_non_exhaustive()
    }
}

impl Sealer {
    pub(crate) fn new(secrets: &ConnectionTrafficSecrets, seq: u64, shared: Arc<Shared>) -> io::Result<Self> {
        Ok(Self {
            key: RecordKey::new(secrets, seq)?,
            shared,
            out: Vec::with_capacity(WRITE_BATCH + MAX_CIPHERTEXT + HEADER),
            open: None,
        })
    }

    #[cfg(test)]
    fn with_limit(mut self, limit: u64) -> Self {
        self.key.limit = limit;
        self
    }

    /// Encrypts `parts` as application data and hands the records to
    /// `write`, in order. Returns the bytes written.
    pub(crate) fn seal(&mut self, parts: &[&[u8]], write: &mut Write<'_>) -> io::Result<u64> {
        let mut written = 0;
        if self.shared.update_requested.swap(false, Ordering::AcqRel) {
            self.update_keys()?;
        }
        for part in parts {
            let mut part = *part;
            while !part.is_empty() {
                let start = match self.open {
                    Some(start) => start,
                    None => self.begin(APPLICATION_DATA)?,
                };
                let room = MAX_PLAINTEXT - (self.out.len() - start - HEADER);
                let take = room.min(part.len());
                self.out.extend_from_slice(&part[..take]);
                part = &part[take..];
                if take == room {
                    self.finish(APPLICATION_DATA)?;
                    if self.out.len() >= WRITE_BATCH {
                        written += self.flush(write)?;
                    }
                }
            }
        }
        if self.open.is_some() {
            self.finish(APPLICATION_DATA)?;
        }
        written += self.flush(write)?;
        Ok(written)
    }

    /// Sends the close_notify alert that ends the session.
    pub(crate) fn close(&mut self, write: &mut Write<'_>) -> io::Result<()> {
        self.begin(ALERT)?;
        self.out.extend_from_slice(&[1, 0]);
        self.finish(ALERT)?;
        self.flush(write).map(|_| ())
    }

    /// Opens a record in `out`, first updating the key if this one has
    /// protected all the records it may.
    fn begin(&mut self, content: u8) -> io::Result<usize> {
        // One record is kept for the key update message itself.
        if content == APPLICATION_DATA && self.key.seq >= self.key.limit.saturating_sub(1) {
            self.update_keys()?;
        }
        let start = self.out.len();
        self.out.extend_from_slice(&[APPLICATION_DATA, 3, 3, 0, 0]);
        self.open = Some(start);
        Ok(start)
    }

    /// Appends the content type, encrypts the open record in place and
    /// writes its length and tag.
    fn finish(&mut self, content: u8) -> io::Result<()> {
        let start = self.open.take().expect("a record is open");
        self.out.push(content);
        let len = self.out.len() - start - HEADER + TAG;
        let len16 = u16::try_from(len).expect("a record's length fits 16 bits");
        self.out[start + 3..start + HEADER].copy_from_slice(&len16.to_be_bytes());
        let aad: [u8; HEADER] = self.out[start..start + HEADER].try_into().expect("header");
        let nonce = self.key.nonce()?;
        let tag = self
            .key
            .key
            .seal_in_place_separate_tag(nonce, Aad::from(aad), &mut self.out[start + HEADER..])
            .map_err(|_| invalid("TLS encryption failed".into()))?;
        self.out.extend_from_slice(tag.as_ref());
        Ok(())
    }

    /// Sends a KeyUpdate under the current key and moves to the next.
    fn update_keys(&mut self) -> io::Result<()> {
        self.begin(HANDSHAKE)?;
        self.out.extend_from_slice(&[KEY_UPDATE, 0, 0, 1, 0]);
        self.finish(HANDSHAKE)?;
        self.key = RecordKey::new(&self.shared.next(true)?, 0)?;
        Ok(())
    }

    fn flush(&mut self, write: &mut Write<'_>) -> io::Result<u64> {
        write(&self.out)?;
        let written = self.out.len() as u64;
        self.out.clear();
        Ok(written)
    }
}

/// The receiving direction of a connection.
pub(crate) struct Opener {
    key: RecordKey,
    shared: Arc<Shared>,
    /// Ciphertext read from the socket; records are decrypted in place.
    raw: Vec<u8>,
    /// The records not opened yet: `raw[start..end]`.
    start: usize,
    end: usize,
    /// Plaintext of the last record opened, not handed out yet.
    plain: std::ops::Range<usize>,
    /// Plaintext decrypted during the handshake, handed out first.
    early: Vec<u8>,
    closed: bool,
    received: u64,
}

impl std::fmt::Debug for Opener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Opener")
            .field("seq", &self.key.seq)
            .field("received", &self.received)
            .finish_non_exhaustive()
    }
}

impl Opener {
    /// `pending` is ciphertext the handshake read past its end, `early`
    /// plaintext it already decrypted.
    pub(crate) fn new(
        secrets: &ConnectionTrafficSecrets,
        seq: u64,
        shared: Arc<Shared>,
        pending: &[u8],
        early: Vec<u8>,
    ) -> io::Result<Self> {
        let mut raw = vec![0; READ_BUFFER.max(pending.len())];
        raw[..pending.len()].copy_from_slice(pending);
        Ok(Self {
            key: RecordKey::new(secrets, seq)?,
            shared,
            raw,
            start: 0,
            end: pending.len(),
            plain: 0..0,
            early,
            closed: false,
            // Read from the socket by the handshake, past its end.
            received: pending.len() as u64,
        })
    }

    /// Ciphertext bytes read from the socket so far.
    pub(crate) fn received(&self) -> u64 {
        self.received
    }

    /// Reads plaintext into `buf`; `fill` reads ciphertext from the socket.
    /// 0 means the peer ended the session (with close_notify; a stream that
    /// just stops is an error, as it may have been cut short).
    pub(crate) fn read(
        &mut self,
        buf: &mut [u8],
        fill: impl FnMut(&mut [u8]) -> io::Result<usize>,
    ) -> io::Result<usize> {
        self.read_to(
            buf.len(),
            |at, plain| {
                buf[at..at + plain.len()].copy_from_slice(plain);
                Ok(())
            },
            fill,
        )
    }

    /// Hands up to `max` bytes of plaintext to `sink` (with the count
    /// handed so far; at most a record's worth per call, straight from
    /// where it was decrypted); `fill` reads ciphertext from the socket.
    /// Returns the bytes handed over, 0 when the peer ended the session.
    pub(crate) fn read_to(
        &mut self,
        max: usize,
        mut sink: impl FnMut(usize, &[u8]) -> io::Result<()>,
        mut fill: impl FnMut(&mut [u8]) -> io::Result<usize>,
    ) -> io::Result<usize> {
        if max == 0 {
            return Ok(0);
        }
        loop {
            if !self.early.is_empty() {
                let n = max.min(self.early.len());
                sink(0, &self.early[..n])?;
                self.early.drain(..n);
                return Ok(n);
            }
            if !self.plain.is_empty() {
                let mut n = max.min(self.plain.len());
                sink(0, &self.raw[self.plain.start..self.plain.start + n])?;
                self.plain.start += n;
                // Go on with the records already here, without a read.
                while n < max && self.plain.is_empty() && self.open_record()? && !self.plain.is_empty() {
                    let more = (max - n).min(self.plain.len());
                    sink(n, &self.raw[self.plain.start..self.plain.start + more])?;
                    self.plain.start += more;
                    n += more;
                }
                return Ok(n);
            }
            if self.closed {
                return Ok(0);
            }
            if self.open_record()? {
                continue;
            }
            // Room for at least one whole record after what is here.
            if self.start == self.end {
                (self.start, self.end) = (0, 0);
            } else if self.raw.len() - self.end < MAX_CIPHERTEXT + HEADER {
                self.raw.copy_within(self.start..self.end, 0);
                (self.start, self.end) = (0, self.end - self.start);
            }
            let n = fill(&mut self.raw[self.end..])?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the TLS stream ended without close_notify (cut short)",
                ));
            }
            self.received += n as u64;
            self.end += n;
        }
    }

    /// Opens the next record if it is all here. Returns false when more
    /// ciphertext is needed.
    fn open_record(&mut self) -> io::Result<bool> {
        let here = &self.raw[self.start..self.end];
        if here.len() < HEADER {
            return Ok(false);
        }
        let (outer, len) = (here[0], u16::from_be_bytes([here[3], here[4]]) as usize);
        if outer != APPLICATION_DATA {
            return Err(match outer {
                ALERT if len == 2 && here.len() >= HEADER + 2 => alert_error(here[HEADER + 1]),
                _ => invalid(format!("TLS record of type {outer} after the handshake")),
            });
        }
        if !(TAG + 1..=MAX_CIPHERTEXT).contains(&len) {
            return Err(invalid(format!("TLS record of {len} bytes")));
        }
        if here.len() < HEADER + len {
            return Ok(false);
        }
        let aad: [u8; HEADER] = here[..HEADER].try_into().expect("header");
        let body = self.start + HEADER;
        self.start = body + len;
        let nonce = self.key.nonce()?;
        let plain = self
            .key
            .key
            .open_in_place(nonce, Aad::from(aad), &mut self.raw[body..body + len])
            .map_err(|_| invalid("a TLS record failed authentication (corrupted or forged)".into()))?;
        // The content type is the last byte that is not padding.
        let Some(typed) = plain.iter().rposition(|&b| b != 0) else {
            return Err(invalid("a TLS record without a content type".into()));
        };
        if typed > MAX_PLAINTEXT {
            return Err(invalid(format!("TLS record of {typed} plaintext bytes")));
        }
        let content = &plain[..typed];
        match plain[typed] {
            APPLICATION_DATA => self.plain = body..body + typed,
            ALERT => match content {
                [_, 0] => self.closed = true,
                [_, description] => return Err(alert_error(*description)),
                _ => return Err(invalid("a malformed TLS alert".into())),
            },
            HANDSHAKE => self.handshake(body, typed)?,
            other => return Err(invalid(format!("TLS content type {other} after the handshake"))),
        }
        Ok(true)
    }

    /// Post-handshake messages: key updates are followed, session tickets
    /// ignored (migrations do not resume sessions).
    fn handshake(&mut self, body: usize, len: usize) -> io::Result<()> {
        let mut messages = &self.raw[body..body + len];
        let mut update = None;
        while !messages.is_empty() {
            let [kind, a, b, c, rest @ ..] = messages else {
                return Err(invalid("a truncated TLS handshake message".into()));
            };
            let size = u32::from_be_bytes([0, *a, *b, *c]) as usize;
            if rest.len() < size {
                return Err(invalid("a truncated TLS handshake message".into()));
            }
            match (*kind, &rest[..size]) {
                (KEY_UPDATE, [requested @ (0 | 1)]) => update = Some(*requested == 1),
                (NEW_SESSION_TICKET, _) => {}
                (kind, _) => return Err(invalid(format!("TLS handshake message {kind} after the handshake"))),
            }
            messages = &rest[size..];
        }
        if let Some(requested) = update {
            self.key = RecordKey::new(&self.shared.next(false)?, 0)?;
            if requested {
                self.shared.update_requested.store(true, Ordering::Release);
            }
        }
        Ok(())
    }
}

fn alert_error(description: u8) -> io::Error {
    invalid(format!(
        "the peer ended the TLS session with {:?} (does it trust this side's certificate?)",
        rustls::AlertDescription::from(description)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Keys that follow from a generation number: both sides derive the
    /// same ones, as rustls would from the shared secret.
    struct Generations {
        tx: u8,
        rx: u8,
    }

    fn secrets(generation: u8) -> ConnectionTrafficSecrets {
        let mut key = [0u8; 32];
        key.fill(generation.wrapping_mul(7).wrapping_add(1));
        // All 32 bytes: an AES-256 key.
        ConnectionTrafficSecrets::Aes256Gcm {
            key: rustls::crypto::cipher::AeadKey::from(key),
            iv: rustls::crypto::cipher::Iv::from([generation; 12]),
        }
    }

    impl NextKeys for Generations {
        fn next_tx(&mut self) -> Result<ConnectionTrafficSecrets, rustls::Error> {
            self.tx += 1;
            Ok(secrets(self.tx))
        }

        fn next_rx(&mut self) -> Result<ConnectionTrafficSecrets, rustls::Error> {
            self.rx += 1;
            Ok(secrets(self.rx))
        }
    }

    fn pair(limit: u64) -> (Sealer, Opener) {
        let keys = || Shared::new(Box::new(Generations { tx: 0, rx: 0 }));
        let sealer = Sealer::new(&secrets(0), 0, keys()).expect("sealer").with_limit(limit);
        let opener = Opener::new(&secrets(0), 0, keys(), &[], Vec::new()).expect("opener");
        (sealer, opener)
    }

    /// A writer of records that appends them to `wire`.
    fn into(wire: &mut Vec<u8>) -> impl FnMut(&[u8]) -> io::Result<()> + '_ {
        |records| {
            wire.extend_from_slice(records);
            Ok(())
        }
    }

    /// Reads everything in `wire` through `opener`, the socket giving
    /// `chunk` bytes at a time.
    fn read_all(opener: &mut Opener, wire: &[u8], chunk: usize, want: usize) -> io::Result<Vec<u8>> {
        let mut at = 0;
        let mut out = vec![0u8; want];
        let mut filled = 0;
        while filled < want {
            let n = opener.read(&mut out[filled..], |buf| {
                let n = buf.len().min(chunk).min(wire.len() - at);
                buf[..n].copy_from_slice(&wire[at..at + n]);
                at += n;
                Ok(n)
            })?;
            if n == 0 {
                return Err(io::Error::other("closed early"));
            }
            filled += n;
        }
        Ok(out)
    }

    #[test]
    fn records_carry_data_across_key_updates() {
        // A key may protect 3 records: 200 KiB takes 13 records and four
        // key updates.
        let (mut sealer, mut opener) = pair(3);
        let data: Vec<u8> = (0..200 << 10).map(|i| (i % 251) as u8).collect();
        let mut wire = Vec::new();
        sealer
            .seal(&[&data[..1000], &data[1000..]], &mut into(&mut wire))
            .expect("seal");
        sealer.close(&mut into(&mut wire)).expect("close");
        let got = read_all(&mut opener, &wire, 7000, data.len()).expect("read");
        assert_eq!(got, data);
        let mut byte = [0u8];
        assert_eq!(
            opener.read(&mut byte, |_| Ok(0)).expect("close"),
            0,
            "close_notify ends the stream"
        );
    }

    #[test]
    fn a_stream_cut_without_close_notify_is_an_error() {
        let (mut sealer, mut opener) = pair(u64::MAX);
        let mut wire = Vec::new();
        sealer.seal(&[b"hello"], &mut into(&mut wire)).expect("seal");
        let err = read_all(&mut opener, &wire, 1 << 20, 6).expect_err("cut");
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "{err}");
    }

    #[test]
    fn every_flipped_bit_fails_authentication() {
        let (mut sealer, _) = pair(u64::MAX);
        let mut wire = Vec::new();
        sealer.seal(&[b"page bytes"], &mut into(&mut wire)).expect("seal");
        for bit in 0..wire.len() * 8 {
            let mut bad = wire.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            let (_, mut opener) = pair(u64::MAX);
            assert!(
                read_all(&mut opener, &bad, 1 << 20, 10).is_err(),
                "bit {bit} went unnoticed"
            );
        }
    }

    proptest! {
        #[test]
        fn any_bytes_are_refused_or_read_without_panicking(wire in proptest::collection::vec(any::<u8>(), 0..40_000), chunk in 1usize..20_000) {
            let (_, mut opener) = pair(u64::MAX);
            let _ = read_all(&mut opener, &wire, chunk, 64);
        }

        #[test]
        fn any_split_of_parts_round_trips(sizes in proptest::collection::vec(0usize..40_000, 1..5), chunk in 1usize..70_000, limit in 2u64..6) {
            let (mut sealer, mut opener) = pair(limit);
            let data: Vec<Vec<u8>> = sizes.iter().enumerate().map(|(i, &n)| vec![i as u8 + 1; n]).collect();
            let parts: Vec<&[u8]> = data.iter().map(|d| &d[..]).collect();
            let mut wire = Vec::new();
            sealer.seal(&parts, &mut into(&mut wire)).expect("seal");
            let all = data.concat();
            let got = read_all(&mut opener, &wire, chunk, all.len()).expect("read");
            prop_assert_eq!(got, all);
        }
    }
}
