//! Every target on its corpus, on every saved finding, and on a short
//! deterministic run of mutations: a finding once made stays a test.

use migration_fuzz::{Rng, TARGETS, mutate, seeds};
use std::path::Path;

fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<_> = entries
        .flatten()
        .filter_map(|e| {
            Some((
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).ok()?,
            ))
        })
        .collect();
    out.sort();
    out
}

#[test]
fn every_target_survives_its_corpus_and_saved_findings() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for (name, run) in TARGETS {
        let corpus = files(&root.join("corpus").join(name));
        assert!(!corpus.is_empty(), "fuzz/corpus/{name} holds the seed corpus");
        for (_, input) in corpus {
            run(&input);
        }
    }
    for (file, input) in files(&root.join("regressions")) {
        let target = TARGETS
            .iter()
            .find(|(name, _)| file.starts_with(&format!("{name}-")))
            .unwrap_or_else(|| panic!("fuzz/regressions/{file} names no target"));
        (target.1)(&input);
    }
}

#[test]
fn a_short_deterministic_run_of_every_target_finds_nothing() {
    let mut rng = Rng::new(0x5eed);
    for (name, run) in TARGETS {
        let corpus = seeds(name);
        for _ in 0..2_000 {
            let base = &corpus[rng.next_u64() as usize % corpus.len()];
            let other = &corpus[rng.next_u64() as usize % corpus.len()];
            run(&mutate(&mut rng, base, other));
        }
    }
}

#[test]
fn the_engine_target_reaches_the_end_it_checks() {
    // Every seed runs to the finish or to the switch to postcopy, where the
    // no-lost-write check is made; both ends are reached.
    let outcomes: Vec<_> = seeds("engine")
        .iter()
        .map(|s| migration_fuzz::engine_outcome(s))
        .collect();
    for outcome in &outcomes {
        assert!(
            matches!(
                outcome,
                migration_fuzz::EngineOutcome::Finished | migration_fuzz::EngineOutcome::Postcopy
            ),
            "{outcomes:?}"
        );
    }
    assert!(
        outcomes.contains(&migration_fuzz::EngineOutcome::Finished),
        "{outcomes:?}"
    );
}

#[test]
fn the_destination_target_reaches_the_resumed_guest() {
    // The seed is a whole stream: the guest resumes, so mutations of it
    // explore every phase up to the handover.
    for seed in seeds("destination") {
        assert!(migration_fuzz::destination_resumed(&seed));
        // Cut anywhere before GO, it never resumes.
        let go = seed.len() - 16 - 20;
        for cut in [0, 16, seed.len() / 2, go - 1] {
            assert!(!migration_fuzz::destination_resumed(&seed[..cut]), "cut at {cut}");
        }
    }
}
