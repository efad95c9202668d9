//! Socket sends and receives, and positional file writes, through
//! io_uring, on the thread that owns the ring.
//!
//! A [`UringSocket`] holds its own ring and its own duplicate of the
//! socket's descriptor. Every operation is submitted and then waited for
//! to completion before the call returns, so the buffers it points the
//! kernel at (borrowed by the call) outlive the operation: that is the whole
//! safety argument of this module. Short sends and receives are resumed
//! from where they stopped; a receive (and a send) can be bounded by a
//! linked timeout.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::Duration;

use io_uring::{IoUring, opcode, squeue, types};

/// Marks the operation's own completion; the linked timeout gets another.
const OP: u64 = 1;
const TIMEOUT: u64 = 2;

/// A socket driven through a ring of its own.
pub struct UringSocket {
    /// `None` after a ring had to be dropped with entries the kernel never
    /// took and no new one could be made: every call then fails.
    ring: Option<IoUring>,
    fd: OwnedFd,
    timeout: Option<Duration>,
}

impl std::fmt::Debug for UringSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringSocket")
            .field("fd", &self.fd.as_raw_fd())
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl UringSocket {
    /// A ring for `socket` (whose descriptor is duplicated). Fails where
    /// the kernel has no io_uring, or refuses it (then use plain calls).
    pub fn new(socket: &impl AsFd) -> io::Result<Self> {
        let ring = IoUring::new(4)?;
        let fd = socket.as_fd().try_clone_to_owned()?;
        Ok(Self {
            ring: Some(ring),
            fd,
            timeout: None,
        })
    }

    /// Bounds every later send and receive (`None`: wait forever).
    pub fn set_timeout(&mut self, timeout: Option<Duration>) {
        self.timeout = timeout;
    }

    /// Submits `entry` (with a linked timeout when one is set), waits for
    /// its completion and returns its result: bytes moved, or the error.
    ///
    /// # Safety
    ///
    /// Every buffer `entry` points at must stay valid, and not be touched
    /// by anything else, until this returns.
    unsafe fn run(&mut self, entry: squeue::Entry) -> io::Result<usize> {
        let timespec = self.timeout.map(types::Timespec::from);
        let mut expected = 1;
        let Some(ring) = self.ring.as_mut() else {
            return Err(io::Error::other("io_uring ring lost after an earlier failure"));
        };
        {
            let mut sq = ring.submission();
            let entry = entry.user_data(OP);
            // SAFETY: the caller keeps the buffers valid until we return, and
            // we return only after the kernel completed this entry (below).
            // `timespec` lives on this frame until then as well.
            unsafe {
                match &timespec {
                    Some(ts) => {
                        let link = opcode::LinkTimeout::new(ts).build().user_data(TIMEOUT);
                        sq.push_multiple(&[entry.flags(squeue::Flags::IO_LINK), link])
                            .map_err(|_| io::Error::other("io_uring submission queue full"))?;
                        expected = 2;
                    }
                    None => sq
                        .push(&entry)
                        .map_err(|_| io::Error::other("io_uring submission queue full"))?,
                }
            }
        }
        // Wait until every completion is in: the kernel must be done with
        // the buffers before they go back to the caller.
        let mut result = None;
        let mut seen = 0;
        while seen < expected {
            match ring.submit_and_wait(expected - seen) {
                Ok(_) => {}
                Err(e) if !ring.submission().is_empty() && !matches!(e.raw_os_error(), Some(libc::EINTR)) => {
                    // The kernel never took the entries, so it never saw the
                    // buffers: drop the ring with them before anything else
                    // (so no later call can submit them), then try a new one.
                    self.ring = None;
                    self.ring = IoUring::new(4).ok();
                    return Err(e);
                }
                // Interrupted, or taken and in flight: keep waiting for the
                // completions, which the kernel always delivers.
                Err(_) => continue,
            }
            for cqe in ring.completion() {
                seen += 1;
                if cqe.user_data() == OP {
                    result = Some(cqe.result());
                }
            }
        }
        match result {
            Some(n) if n >= 0 => Ok(n as usize),
            Some(n) if -n == libc::ECANCELED && expected == 2 => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no progress within {:?}", self.timeout.unwrap_or_default()),
            )),
            Some(n) => Err(io::Error::from_raw_os_error(-n)),
            None => Err(io::Error::other("io_uring lost a completion")),
        }
    }

    /// Sends every byte of `parts`, in order, resuming short sends.
    pub fn send_all(&mut self, parts: &[&[u8]]) -> io::Result<()> {
        let mut iovecs: Vec<libc::iovec> = parts
            .iter()
            .filter(|p| !p.is_empty())
            .map(|p| libc::iovec {
                iov_base: p.as_ptr() as *mut libc::c_void,
                iov_len: p.len(),
            })
            .collect();
        let mut first = 0;
        while first < iovecs.len() {
            let entry = opcode::Writev::new(
                types::Fd(self.fd.as_raw_fd()),
                iovecs[first..].as_ptr(),
                (iovecs.len() - first).min(libc::UIO_MAXIOV as usize) as u32,
            )
            .build();
            // SAFETY: `iovecs` and the `parts` they point into are borrowed
            // for this whole call and neither is touched until `run` returns.
            let mut sent = unsafe { self.run(entry)? };
            if sent == 0 {
                return Err(io::Error::new(io::ErrorKind::WriteZero, "connection closed"));
            }
            // Skip what went out; resume inside a partly sent buffer.
            while sent > 0 && first < iovecs.len() {
                let iov = &mut iovecs[first];
                if sent >= iov.iov_len {
                    sent -= iov.iov_len;
                    first += 1;
                } else {
                    // SAFETY: `sent < iov_len`, so the pointer stays inside the buffer.
                    iov.iov_base = unsafe { iov.iov_base.cast::<u8>().add(sent) }.cast();
                    iov.iov_len -= sent;
                    sent = 0;
                }
            }
        }
        Ok(())
    }

    /// Receives up to `buf.len()` bytes; 0 means the peer closed.
    pub fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let entry = opcode::Recv::new(types::Fd(self.fd.as_raw_fd()), buf.as_mut_ptr(), buf.len() as u32).build();
        // SAFETY: `buf` is borrowed mutably for this whole call and nothing
        // else touches it until `run` returns.
        unsafe { self.run(entry) }
    }

    /// Writes all of `buf` at `offset` of the file the ring was made for (a positional write,
    /// `O_DIRECT` alignment permitting), resuming short writes.
    pub fn write_all_at(&mut self, mut buf: &[u8], mut offset: u64) -> io::Result<()> {
        while !buf.is_empty() {
            let entry = opcode::Write::new(
                types::Fd(self.fd.as_raw_fd()),
                buf.as_ptr(),
                buf.len().min(1 << 30) as u32,
            )
            .offset(offset)
            .build();
            // SAFETY: `buf` is borrowed for this whole call and not touched until `run`
            // returns, after the kernel completed the write.
            let written = unsafe { self.run(entry)? };
            if written == 0 {
                return Err(io::Error::new(io::ErrorKind::WriteZero, "the file took no bytes"));
            }
            buf = &buf[written..];
            offset += written as u64;
        }
        Ok(())
    }

    /// Receives up to `len` bytes straight into guest memory at `offset`
    /// of `region`; 0 means the peer closed.
    pub fn recv_into(&mut self, region: &crate::GuestRegion, offset: usize, len: usize) -> io::Result<usize> {
        let dst = region.kernel_target(offset, len).map_err(io::Error::other)?;
        let entry = opcode::Recv::new(types::Fd(self.fd.as_raw_fd()), dst, len.min(u32::MAX as usize) as u32).build();
        // SAFETY: `kernel_target` checked the range lies inside the region's
        // mapping, which `region` keeps alive for this whole call; guest
        // memory is never borrowed as a Rust reference, so the kernel's
        // write aliases nothing, and `run` returns only once it is done.
        unsafe { self.run(entry) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        (client, server)
    }

    #[test]
    fn sends_every_part_in_order_and_receives_them() {
        let (client, mut server) = pair();
        let mut ring = UringSocket::new(&client).unwrap();
        let big: Vec<u8> = (0..(3 << 20)).map(|i| (i % 251) as u8).collect();
        let reader = std::thread::spawn(move || {
            let mut all = Vec::new();
            server.read_to_end(&mut all).unwrap();
            all
        });
        ring.send_all(&[b"head", &[], &big, b"tail"]).unwrap();
        drop(ring);
        drop(client);
        let all = reader.join().unwrap();
        assert_eq!(all.len(), 4 + big.len() + 4);
        assert_eq!(&all[..4], b"head");
        assert_eq!(&all[4..4 + big.len()], &big[..]);
        assert_eq!(&all[4 + big.len()..], b"tail");
    }

    #[test]
    fn receives_short_reads_then_end_of_stream() {
        let (mut client, server) = pair();
        let mut ring = UringSocket::new(&server).unwrap();
        client.write_all(b"abc").unwrap();
        let mut buf = [0u8; 16];
        let n = ring.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"abc");
        drop(client);
        assert_eq!(ring.recv(&mut buf).unwrap(), 0);
    }

    #[test]
    fn receives_straight_into_guest_memory() {
        let (mut client, server) = pair();
        let region = crate::GuestRegion::anonymous(4 * crate::PAGE_SIZE).unwrap();
        let mut ring = UringSocket::new(&server).unwrap();
        let data: Vec<u8> = (0..crate::PAGE_SIZE).map(|i| (i % 253) as u8).collect();
        client.write_all(&data).unwrap();
        let mut at = 0;
        while at < data.len() {
            at += ring.recv_into(&region, crate::PAGE_SIZE + at, data.len() - at).unwrap();
        }
        let mut back = vec![0u8; data.len()];
        region.read(crate::PAGE_SIZE, &mut back).unwrap();
        assert_eq!(back, data);
        assert!(region.is_zero(0, crate::PAGE_SIZE).unwrap());
        // Out of the region: refused before the kernel sees it.
        assert!(ring.recv_into(&region, 4 * crate::PAGE_SIZE, 1).is_err());
        // The plain call does the same.
        client.write_all(&data[..100]).unwrap();
        let n = region.recv_from(server.as_fd(), 0, 100).unwrap();
        assert!(n > 0 && n <= 100);
        assert!(region.recv_from(server.as_fd(), 4 * crate::PAGE_SIZE - 1, 2).is_err());
    }

    #[test]
    fn writes_land_at_their_offsets_in_a_file() {
        let path = std::env::temp_dir().join(format!("uring-write-{}", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let mut ring = UringSocket::new(&file).unwrap();
        ring.write_all_at(b"world", 6).unwrap();
        ring.write_all_at(b"hello ", 0).unwrap();
        let mut back = Vec::new();
        std::fs::File::open(&path).unwrap().read_to_end(&mut back).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(back, b"hello world");
    }

    #[test]
    fn a_silent_peer_times_out() {
        let (_client, server) = pair();
        let mut ring = UringSocket::new(&server).unwrap();
        ring.set_timeout(Some(Duration::from_millis(30)));
        let mut buf = [0u8; 16];
        let err = ring.recv(&mut buf).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
        // The ring still works afterwards.
        ring.set_timeout(None);
        drop(_client);
        assert_eq!(ring.recv(&mut buf).unwrap(), 0);
    }
}
