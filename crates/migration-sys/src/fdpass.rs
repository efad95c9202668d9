//! File descriptors passed between processes over a unix stream socket (`SCM_RIGHTS`), the
//! way one process shares memory (a memfd) with another.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

/// Most descriptors one message carries (the kernel's `SCM_MAX_FD` is 253).
pub const MAX_FDS: usize = 253;

/// Room for a control message of `fds` descriptors, in `u64`s so it is aligned for `cmsghdr`.
fn control_words(fds: usize) -> usize {
    // SAFETY: CMSG_SPACE only computes a size from its argument.
    let bytes = unsafe { libc::CMSG_SPACE((fds * size_of::<libc::c_int>()) as u32) } as usize;
    bytes.div_ceil(size_of::<u64>())
}

/// Sends `bytes` (at least one) with `fds` attached, in one `sendmsg(2)`: the receiver gets
/// the descriptors with the first of the bytes. Fails if not every byte went out at once.
pub fn send_with_fds(socket: &UnixStream, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    if bytes.is_empty() || fds.len() > MAX_FDS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "descriptors go with at least one byte, at most 253 at a time",
        ));
    }
    let mut control = vec![0u64; control_words(fds.len())];
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr().cast_mut().cast(),
        iov_len: bytes.len(),
    };
    // SAFETY: an all-zero msghdr is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = control.len() * size_of::<u64>();
        // SAFETY: `msg` points at `control`, which has room (CMSG_SPACE) for one header and
        // `fds.len()` ints; CMSG_FIRSTHDR returns its start, and CMSG_DATA the data within it,
        // so every write stays inside `control`. The data pointer may be unaligned for
        // c_int, hence the unaligned writes.
        unsafe {
            let header = libc::CMSG_FIRSTHDR(&msg);
            (*header).cmsg_level = libc::SOL_SOCKET;
            (*header).cmsg_type = libc::SCM_RIGHTS;
            (*header).cmsg_len = libc::CMSG_LEN((fds.len() * size_of::<libc::c_int>()) as u32) as usize;
            let data = libc::CMSG_DATA(header).cast::<libc::c_int>();
            for (i, fd) in fds.iter().enumerate() {
                data.add(i).write_unaligned(fd.as_raw_fd());
            }
        }
    }
    // SAFETY: `msg` describes `bytes` (read only by the kernel) and `control`, both alive for
    // the call; the descriptors named are borrowed, so open.
    let sent = unsafe { libc::sendmsg(socket.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    if sent as usize != bytes.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            format!("sent {sent} of {} bytes with the descriptors", bytes.len()),
        ));
    }
    Ok(())
}

/// Receives up to `buf.len()` bytes and up to `max_fds` descriptors in one `recvmsg(2)`
/// (close-on-exec). Returns the bytes received (0: the peer closed) and the descriptors.
/// More descriptors than `max_fds` is an error, and those that came are closed.
pub fn recv_with_fds(socket: &UnixStream, buf: &mut [u8], max_fds: usize) -> io::Result<(usize, Vec<OwnedFd>)> {
    let max_fds = max_fds.min(MAX_FDS);
    let mut control = vec![0u64; control_words(max_fds.max(1))];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: an all-zero msghdr is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = control.len() * size_of::<u64>();
    // SAFETY: `msg` describes `buf` and `control`, both writable and alive for the call.
    let received = unsafe { libc::recvmsg(socket.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if received < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    // SAFETY: the kernel filled `control` (up to msg_controllen) with well-formed control
    // messages; CMSG_FIRSTHDR/CMSG_NXTHDR walk them within that length, and each SCM_RIGHTS
    // payload holds (cmsg_len - CMSG_LEN(0)) / sizeof(int) descriptors this process now owns,
    // read unaligned and wrapped once each.
    unsafe {
        let mut header = libc::CMSG_FIRSTHDR(&msg);
        while !header.is_null() {
            if (*header).cmsg_level == libc::SOL_SOCKET && (*header).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(header).cast::<libc::c_int>();
                let count = ((*header).cmsg_len - libc::CMSG_LEN(0) as usize) / size_of::<libc::c_int>();
                for i in 0..count {
                    fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
            header = libc::CMSG_NXTHDR(&msg, header);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 || fds.len() > max_fds {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("the peer sent more than {max_fds} descriptors"),
        ));
    }
    Ok((received as usize, fds))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, Write};
    use std::os::fd::AsFd;

    #[test]
    fn a_file_passed_over_the_socket_is_the_same_file() {
        let (a, b) = UnixStream::pair().expect("socketpair");
        let mut file = tempfile_in_memory();
        file.write_all(b"shared").expect("write");
        send_with_fds(&a, b"x", &[file.as_fd()]).expect("send");
        let mut buf = [0u8; 8];
        let (n, fds) = recv_with_fds(&b, &mut buf, 4).expect("recv");
        assert_eq!((n, &buf[..1], fds.len()), (1, &b"x"[..], 1));
        let mut other = std::fs::File::from(fds.into_iter().next().expect("one fd"));
        other.rewind().expect("seek");
        let mut text = [0u8; 6];
        other.read_exact(&mut text).expect("read");
        assert_eq!(&text, b"shared");
    }

    #[test]
    fn too_many_descriptors_is_an_error_and_plain_bytes_pass() {
        let (a, b) = UnixStream::pair().expect("socketpair");
        let file = tempfile_in_memory();
        send_with_fds(&a, b"y", &[file.as_fd(), file.as_fd()]).expect("send");
        let mut buf = [0u8; 8];
        assert!(recv_with_fds(&b, &mut buf, 1).is_err());
        send_with_fds(&a, b"zz", &[]).expect("send without descriptors");
        let (n, fds) = recv_with_fds(&b, &mut buf, 1).expect("recv");
        assert_eq!((n, fds.len()), (2, 0));
        drop(a);
        assert_eq!(recv_with_fds(&b, &mut buf, 1).expect("eof").0, 0);
        assert!(send_with_fds(&b, b"", &[]).is_err());
    }

    fn tempfile_in_memory() -> std::fs::File {
        let region = crate::GuestRegion::memfd("fdpass-test", crate::PAGE_SIZE).expect("memfd");
        let (file, _) = region.backing().expect("a memfd has a file");
        file.try_clone().expect("dup")
    }
}
