//! The order of runs: scenario by scenario, and within a scenario repetition by repetition with
//! every competitor once per repetition (A B C A B C ...). Slow periods on a shared host then
//! hit all competitors of a comparison alike, instead of one competitor's whole series.

/// One run in the schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    /// Index into the scenario list.
    pub scenario: usize,
    /// Index into the competitor list.
    pub competitor: usize,
    /// Repetition, from 1.
    pub rep: u32,
}

/// The alternating schedule for `reps` repetitions; `pairs[s]` lists the competitors that run
/// scenario `s` (skipped pairs are simply absent), in the order they alternate.
pub fn alternating(pairs: &[Vec<usize>], reps: u32) -> Vec<Slot> {
    let mut slots = Vec::new();
    for (scenario, competitors) in pairs.iter().enumerate() {
        for rep in 1..=reps {
            slots.extend(competitors.iter().map(|&competitor| Slot {
                scenario,
                competitor,
                rep,
            }));
        }
    }
    slots
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(slots: &[Slot]) -> Vec<(usize, usize, u32)> {
        slots
            .iter()
            .map(|s| (s.scenario, s.competitor, s.rep))
            .collect()
    }

    #[test]
    fn competitors_alternate_within_each_repetition() {
        let slots = alternating(&[vec![0, 1]], 3);

        assert_eq!(
            names(&slots),
            [
                (0, 0, 1),
                (0, 1, 1),
                (0, 0, 2),
                (0, 1, 2),
                (0, 0, 3),
                (0, 1, 3)
            ]
        );
    }

    #[test]
    fn scenarios_run_one_after_another_with_their_own_competitors() {
        let slots = alternating(&[vec![2, 0], vec![], vec![1]], 2);

        assert_eq!(
            names(&slots),
            [
                (0, 2, 1),
                (0, 0, 1),
                (0, 2, 2),
                (0, 0, 2),
                (2, 1, 1),
                (2, 1, 2)
            ]
        );
    }

    #[test]
    fn no_competitor_runs_twice_in_a_row_when_there_are_two_or_more() {
        let slots = alternating(&[vec![0, 1, 2], vec![3, 1]], 5);

        for pair in slots.windows(2) {
            if pair[0].scenario == pair[1].scenario {
                assert_ne!(pair[0].competitor, pair[1].competitor, "{pair:?}");
            }
        }
        assert_eq!(slots.len(), 5 * 3 + 5 * 2);
    }
}
