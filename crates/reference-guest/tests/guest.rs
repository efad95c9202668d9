//! The synthetic guest end to end, within one process: run, pause, check, migrate its state.

use std::sync::Arc;
use std::time::Duration;

use migration_core::Vm;
use migration_sys::{GuestRegion, PAGE_SIZE};
use reference_guest::{Content, GuestSpec, Pattern, SyntheticGuest, content};

const WAIT: Duration = Duration::from_secs(10);
const MIB: usize = 1 << 20;

fn ram(sizes: &[usize]) -> Vec<Arc<GuestRegion>> {
    sizes
        .iter()
        .map(|&len| Arc::new(GuestRegion::anonymous(len).expect("anonymous region")))
        .collect()
}

/// Fresh regions holding the same bytes, as a finished migration leaves them.
fn copy_ram(blocks: &[Arc<GuestRegion>]) -> Vec<Arc<GuestRegion>> {
    let copies = ram(&blocks.iter().map(|b| b.len()).collect::<Vec<_>>());
    let mut buf = vec![0u8; 64 * PAGE_SIZE];
    for (src, dst) in blocks.iter().zip(&copies) {
        for offset in (0..src.len()).step_by(buf.len()) {
            let n = buf.len().min(src.len() - offset);
            src.read(offset, &mut buf[..n]).unwrap();
            dst.write(offset, &buf[..n]).unwrap();
        }
    }
    copies
}

fn spec(pattern: Pattern, content: Content, writers: usize) -> GuestSpec {
    GuestSpec {
        dirty_rate: 64 << 20,
        pattern,
        hot_set: 0,
        content,
        writers,
        seed: 0x5eed,
    }
}

fn wait_writes(guest: &SyntheticGuest, at_least: u64) {
    assert!(
        guest.wait_writes(at_least, WAIT),
        "guest made only {} of {at_least} page writes in {WAIT:?}",
        guest.writes()
    );
}

#[test]
fn paused_guest_checks_and_finds_a_corrupt_page() {
    let blocks = ram(&[4 * MIB, 4 * MIB]);
    let mut guest = SyntheticGuest::new(blocks.clone(), spec(Pattern::Uniform, Content::Random, 2), true).unwrap();
    guest.start().unwrap();
    wait_writes(&guest, 500);
    guest.pause().unwrap();
    let writes = guest.writes();
    let report = guest.check();
    assert!(report.is_ok(), "{report}");
    assert_eq!(report.pages_checked, 2048);
    assert_eq!(report.pages_unknown, 0);
    assert_eq!(guest.writes(), writes, "a paused guest wrote");

    blocks[1].fill(5 * PAGE_SIZE, 1, 0xab).unwrap();
    let report = guest.check();
    assert_eq!(report.mismatches, 1);
    assert_eq!(report.first_mismatch, Some((1, 5)));

    // A page moved to the wrong place is caught by its header.
    let mut page = vec![0u8; PAGE_SIZE];
    blocks[0].read(3 * PAGE_SIZE, &mut page).unwrap();
    blocks[0].write(4 * PAGE_SIZE, &page).unwrap();
    let report = guest.check();
    assert_eq!(report.mismatches, 2);
    assert_eq!(report.first_mismatch, Some((0, 4)));

    guest.resume().unwrap();
    wait_writes(&guest, writes + 100);
    guest.pause().unwrap();
    // Writers may have healed the damaged pages meanwhile, and broken nothing else.
    assert!(guest.check().mismatches <= 2);
}

#[test]
fn state_migrates_and_the_destination_checks_itself() {
    let blocks = ram(&[4 * MIB, 2 * MIB]);
    let mut source = SyntheticGuest::new(blocks.clone(), spec(Pattern::Uniform, Content::Text, 3), true).unwrap();
    source.start().unwrap();
    wait_writes(&source, 1000);
    source.pause().unwrap();
    assert!(source.save_device_state().is_ok());
    let state = source.save_device_state().unwrap();
    let writes = source.writes();

    let mut dest = SyntheticGuest::destination(copy_ram(&blocks));
    dest.load_device_state(&state).unwrap();
    assert_eq!(dest.spec(), source.spec());
    assert_eq!(dest.writes(), writes);
    // Paused straight after it starts: the check still runs, the writers wait. (They do not
    // wait for the check: each page is checked before its first write, by whoever gets there
    // first, so a few may have been written before the pause.)
    dest.resume().unwrap();
    dest.pause().unwrap();
    let paused_at = dest.writes();
    assert!(paused_at >= writes);
    let report = dest.wait_check(WAIT).expect("self-check verdict");
    assert!(report.is_ok(), "{report}");
    assert_eq!(report.pages_checked, 1536);
    assert_eq!(dest.writes(), paused_at, "a paused guest wrote");
    assert!(dest.first_access().is_some());

    dest.resume().unwrap();
    wait_writes(&dest, writes + 500);
    dest.pause().unwrap();
    assert!(dest.check().is_ok());

    // The source, resumed after a failed migration, carries on too.
    source.resume().unwrap();
    wait_writes(&source, writes + 100);
}

#[test]
fn destination_finds_a_page_the_migration_lost() {
    let blocks = ram(&[2 * MIB, 2 * MIB]);
    let mut source =
        SyntheticGuest::new(blocks.clone(), spec(Pattern::Sequential, Content::ZeroHeavy, 2), true).unwrap();
    source.start().unwrap();
    wait_writes(&source, 300);
    source.pause().unwrap();
    let state = source.save_device_state().unwrap();

    let copies = copy_ram(&blocks);
    // Page 7 of block 0 keeps an older generation, as if its last resend never arrived.
    // (A random page of the previous generation: never equal to the current content.)
    let generation = source.generation(7).unwrap();
    let stale = content(0x5eed, 7, generation.wrapping_sub(1), Content::Random);
    copies[0].write(7 * PAGE_SIZE, &stale).unwrap();

    let mut dest = SyntheticGuest::destination(copies);
    dest.load_device_state(&state).unwrap();
    dest.resume().unwrap();
    let report = dest.wait_check(WAIT).expect("self-check verdict");
    assert_eq!(report.mismatches, 1, "{report}");
    assert_eq!(report.first_mismatch, Some((0, 7)));
}

#[test]
fn unpopulated_pages_are_unknown_until_rewritten() {
    let blocks = ram(&[MIB]);
    blocks[0].fill(0, MIB, 0x11).unwrap();
    let mut guest = SyntheticGuest::new(
        blocks.clone(),
        GuestSpec {
            hot_set: 64 * PAGE_SIZE as u64,
            ..spec(Pattern::HotSet, Content::Random, 1)
        },
        false,
    )
    .unwrap();
    let report = guest.check();
    assert_eq!((report.pages_checked, report.pages_unknown), (0, 256));
    guest.start().unwrap();
    wait_writes(&guest, 1000);
    guest.pause().unwrap();
    let report = guest.check();
    assert!(report.is_ok(), "{report}");
    assert!(report.pages_checked > 0 && report.pages_checked <= 64);
    assert_eq!(report.pages_checked + report.pages_unknown, 256);
    assert_eq!(guest.generation(100), None);

    let state = guest.save_device_state().unwrap();
    let mut dest = SyntheticGuest::destination(copy_ram(&blocks));
    dest.load_device_state(&state).unwrap();
    dest.resume().unwrap();
    assert_eq!(dest.wait_check(WAIT), Some(report));
}

#[test]
fn bad_state_is_refused_without_panic() {
    let blocks = ram(&[MIB, MIB]);
    let mut source = SyntheticGuest::new(blocks.clone(), spec(Pattern::Uniform, Content::Random, 2), true).unwrap();
    source.start().unwrap();
    assert!(source.save_device_state().is_err(), "saved a running guest");
    wait_writes(&source, 100);
    source.pause().unwrap();
    let state = source.save_device_state().unwrap();

    let mut dest = SyntheticGuest::destination(copy_ram(&blocks));
    assert!(dest.resume().is_err(), "ran without device state");
    assert!(dest.save_device_state().is_err());
    for len in 0..state.len() {
        assert!(dest.load_device_state(&state[..len]).is_err(), "len {len}");
    }
    for i in (0..state.len()).step_by(7) {
        let mut bad = state.clone();
        bad[i] ^= 0x40;
        assert!(dest.load_device_state(&bad).is_err(), "byte {i}");
    }
    let mut smaller = SyntheticGuest::destination(ram(&[MIB]));
    assert!(smaller.load_device_state(&state).is_err());

    dest.load_device_state(&state).unwrap();
    dest.resume().unwrap();
    assert!(dest.load_device_state(&state).is_err(), "loaded into a running guest");
    assert!(dest.wait_check(WAIT).unwrap().is_ok());
}

#[test]
fn hot_set_writes_only_the_hot_pages_across_blocks() {
    // 1024 pages per block; the hot set is the first 1280 pages, reaching into block 1.
    let mut guest = SyntheticGuest::new(
        ram(&[4 * MIB, 4 * MIB]),
        GuestSpec {
            hot_set: 5 * MIB as u64,
            ..spec(Pattern::HotSet, Content::Random, 3)
        },
        true,
    )
    .unwrap();
    guest.start().unwrap();
    wait_writes(&guest, 3000);
    guest.pause().unwrap();
    let generations: Vec<u32> = (0..2048).map(|p| guest.generation(p).unwrap()).collect();
    assert!(generations[1280..].iter().all(|&g| g == 0));
    assert!(generations[1024..1280].iter().any(|&g| g > 0));
    let total: u64 = generations.iter().map(|&g| u64::from(g)).sum();
    assert_eq!(total, guest.writes());
    assert!(guest.check().is_ok());
}

#[test]
fn sequential_writers_walk_their_pages_in_order() {
    let writers = 2;
    let mut guest = SyntheticGuest::new(
        ram(&[MIB, MIB]),
        spec(Pattern::Sequential, Content::Random, writers),
        true,
    )
    .unwrap();
    guest.start().unwrap();
    wait_writes(&guest, 1500); // wraps: 512 pages
    guest.pause().unwrap();
    let mut total = 0;
    for w in 0..writers as u64 {
        let generations: Vec<u32> = (w..512)
            .step_by(writers)
            .map(|p| guest.generation(p).unwrap())
            .collect();
        // One sweep ahead up to the writer's position, then the previous sweep.
        let base = *generations.last().unwrap();
        let ahead = generations.iter().take_while(|&&g| g == base + 1).count();
        assert!(
            generations[ahead..].iter().all(|&g| g == base),
            "writer {w}: {generations:?}"
        );
        total += u64::from(base) * generations.len() as u64 + ahead as u64;
    }
    assert_eq!(total, guest.writes());
    assert!(total >= 1500);
}

#[test]
fn idle_and_fully_throttled_guests_pause() {
    let mut idle = SyntheticGuest::new(ram(&[MIB, MIB]), GuestSpec::default(), true).unwrap();
    idle.start().unwrap();
    idle.pause().unwrap();
    assert_eq!(idle.writes(), 0);
    assert!(idle.save_device_state().is_ok());
    assert!(idle.start().is_err());

    let mut guest = SyntheticGuest::new(ram(&[MIB, MIB]), spec(Pattern::Uniform, Content::Text, 2), true).unwrap();
    guest.throttle(100).unwrap();
    guest.start().unwrap();
    guest.pause().unwrap();
    assert_eq!(guest.writes(), 0, "a fully throttled guest wrote");
    guest.resume().unwrap();
    guest.throttle(50).unwrap();
    wait_writes(&guest, 200);
    guest.throttle(0).unwrap();
    guest.pause().unwrap();
    assert!(guest.check().is_ok());
}

#[test]
fn invalid_specs_are_refused() {
    let blocks = ram(&[MIB]);
    let zero_writers = GuestSpec {
        writers: 0,
        ..GuestSpec::default()
    };
    assert!(SyntheticGuest::new(blocks.clone(), zero_writers, false).is_err());
    let empty_hot_set = GuestSpec {
        pattern: Pattern::HotSet,
        ..GuestSpec::default()
    };
    assert!(SyntheticGuest::new(blocks, empty_hot_set, false).is_err());
    assert!(SyntheticGuest::new(ram(&[]), GuestSpec::default(), false).is_err());
}
