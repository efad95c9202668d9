//! The KVM micro-VM between two `migrate-cli` processes: its vCPUs keep
//! running while it migrates, KVM's dirty log tracks them, their registers
//! travel as device state, and on the destination the guest checks its own
//! pages and reports the verdict.
//!
//! Where `/dev/kvm` is not usable these tests say so and pass, unless
//! `MIGRATE_REQUIRE_KVM=1` (which CI sets) makes that a failure.

use migration_tests::{
    assert_pair_completed, assert_send_failed_resumed, field, lock, num, send_cut_at_device_state, spawn_recv,
    spawn_send,
};

/// 64 MiB over 2 vCPUs: a status page each and (16384 - 1) / 2 - 1 data pages.
const DATA_PAGES: u64 = 2 * (16383 / 2 - 1);

fn kvm_guest<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "--json",
        "--guest",
        "kvm",
        "--vcpus",
        "2",
        "--mem-size",
        "64M",
        "--dirty-rate",
        "64M",
    ];
    args.extend_from_slice(extra);
    args
}

#[test]
fn a_running_kvm_guest_migrates_live_and_passes_its_own_check() {
    if !reference_guest::kvm::kvm_for_tests() {
        return;
    }
    let _lock = lock();
    let (recv, addr) = spawn_recv(&["--json"]);
    // Over a link of 48 MB/s the first pass takes over a second, so the
    // guest rewrites many pages meanwhile and later passes resend them.
    let send = spawn_send(addr, &kvm_guest(&["--max-bandwidth", "48M"]));
    let (send, recv) = assert_pair_completed(send, recv);
    assert_eq!(field(&recv, "guest"), "kvm", "{recv:#}");
    assert_eq!(field(&recv, "guest_check"), "passed", "{recv:#}");
    assert_eq!(num(&recv, "guest_pages_checked"), DATA_PAGES, "{recv:#}");
    assert!(
        num(&send, "iterations") >= 2,
        "the vCPUs wrote during the first pass, so pages went again: {send:#}"
    );
    assert!(
        num(&send, "transferred_bytes") > num(&send, "ram_bytes"),
        "pages the guest rewrote were sent again: {send:#}"
    );
}

#[test]
fn a_kvm_guest_runs_on_the_destination_in_postcopy_while_its_pages_arrive() {
    if !reference_guest::kvm::kvm_for_tests() {
        return;
    }
    let _lock = lock();
    let (recv, addr) = spawn_recv(&["--json"]);
    // Postcopy at once: the vCPUs run on the destination before any page
    // was sent, and KVM's faults on missing pages go through userfaultfd.
    let send = spawn_send(addr, &kvm_guest(&["--postcopy", "--postcopy-after", "0"]));
    let (send, recv) = assert_pair_completed(send, recv);
    assert!(!field(&send, "postcopy").is_null(), "switched to postcopy: {send:#}");
    assert_eq!(field(&recv, "guest"), "kvm", "{recv:#}");
    assert_eq!(field(&recv, "guest_check"), "passed", "{recv:#}");
    assert_eq!(num(&recv, "guest_pages_checked"), DATA_PAGES, "{recv:#}");
}

#[test]
fn a_kvm_guest_keeps_running_on_the_source_when_the_migration_fails_after_the_pause() {
    if !reference_guest::kvm::kvm_for_tests() {
        return;
    }
    let _lock = lock();
    // The link is cut when the vCPU state goes out: the vCPUs were paused.
    let out = send_cut_at_device_state(&kvm_guest(&[]));
    let json = assert_send_failed_resumed(&out);
    assert!(out.stderr_has("send: source paused"), "{}", out.describe());
    assert!(
        num(&json, "writes_after_resume") >= 16,
        "the source's vCPUs run again: {json:#}"
    );
}
