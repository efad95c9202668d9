//! What one dirty-log sync costs per GiB of guest RAM with a KVM guest:
//! `KvmDirtyLog::collect` (`KVM_GET_DIRTY_LOG` + `KVM_CLEAR_DIRTY_LOG`) over a
//! 1 GiB slot with none, ~0.1% and ~1% of its pages written by the guest's
//! two vCPUs (the guest rewrites about 1000 pages a second per vCPU here), next to the kernel's own tracker (`KernelDirtyLog`:
//! userfaultfd write-protect + `PAGEMAP_SCAN`) over another 1 GiB with the
//! same number of pages written by the host, measured in the same run.
//!
//! `kvm-dirty-sync [--reps N]` prints one JSON line per dirty fraction.

use anyhow::{Context, Result};
use migration_core::{DirtyLog, KernelDirtyLog, KvmDirtyLog, Ram, RamBlock};
use migration_sys::{GuestRegion, PAGE_SIZE};
use reference_guest::kvm::KvmGuest;
use std::sync::Arc;
use std::time::{Duration, Instant};

const GIB: usize = 1 << 30;

fn ram(region: &Arc<GuestRegion>) -> Ram {
    Ram::new(vec![RamBlock::new("ram", Arc::clone(region))])
}

/// Times one collect; returns (seconds, pages reported).
fn sync(log: &mut dyn DirtyLog) -> Result<(f64, u64)> {
    let start = Instant::now();
    let pages = log.collect(&mut |_, _, _| {})?;
    Ok((start.elapsed().as_secs_f64(), pages))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let reps = args
        .iter()
        .position(|a| a == "--reps")
        .and_then(|i| args.get(i + 1))
        .map_or(Ok(5), |r| r.parse())
        .context("--reps N")?;
    let pages = (GIB / PAGE_SIZE) as u64;

    // The KVM guest: two vCPUs over 1 GiB, booted (every page holds data), paced so fast it
    // is not paced at all.
    let kvm_region = Arc::new(GuestRegion::anonymous(GIB)?);
    let mut guest = KvmGuest::new(vec![Arc::clone(&kvm_region)], 2, u64::MAX / 2).context("booting")?;
    let memory = guest.memory().context("slots")?;
    let mut kvm_log = KvmDirtyLog::start(memory, &ram(&kvm_region))?;
    eprintln!("manual protect: {}", kvm_log.manual_protect());

    // The baseline: the kernel's tracker over another GiB, every page populated.
    let host_region = Arc::new(GuestRegion::anonymous(GIB)?);
    host_region.populate_write(0, GIB)?;
    let mut kernel_log = KernelDirtyLog::start(&ram(&host_region))?;
    sync(&mut kernel_log)?;

    for (name, fraction) in [("clean", 0.0), ("0.1%", 0.001), ("1%", 0.01)] {
        let target = (pages as f64 * fraction) as u64;
        let (mut kvm_secs, mut kernel_secs, mut kvm_pages) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..reps {
            if target > 0 {
                let before = guest.writes();
                guest.start()?;
                guest.wait_writes(before + target, Duration::from_secs(120));
                migration_core::Vm::pause(&mut guest)?;
            }
            let (secs, reported) = sync(&mut kvm_log)?;
            kvm_secs.push(secs);
            kvm_pages.push(reported as f64);
            // The same number of pages, written by the host, found by the kernel's tracker.
            let page = [1u8; 8];
            let stride = if reported > 0 { pages / reported.min(pages) } else { 1 };
            for i in 0..reported.min(pages) {
                host_region.write(((i * stride) % pages) as usize * PAGE_SIZE, &page)?;
            }
            kernel_secs.push(sync(&mut kernel_log)?.0);
        }
        let (kvm, kernel) = (median(kvm_secs), median(kernel_secs));
        println!(
            "{{\"dirty\":\"{name}\",\"dirty_pages\":{:.0},\"kvm_ms_per_gib\":{:.3},\"kernel_ms_per_gib\":{:.3},\"kvm_over_kernel\":{:.2}}}",
            median(kvm_pages),
            kvm * 1e3,
            kernel * 1e3,
            kvm / kernel
        );
    }
    Ok(())
}
