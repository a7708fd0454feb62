//! The pure assignment solver; see `README.md` beside this file for the goals.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};

/// A subscription, as the solver sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Load {
    /// Chain it is on.
    pub chain: u64,
    /// Relative cost (>= 1).
    pub weight: u32,
}

/// A worker, as the solver sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    /// Chains it serves.
    pub chains: BTreeSet<u64>,
    /// Largest total weight it may own; 0 = unbounded.
    pub capacity: u32,
}

/// Subscriptions `0..S` and workers `0..N`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Problem {
    /// Subscription `s` is `subscriptions[s]`.
    pub subscriptions: Vec<Load>,
    /// Worker `k` is `workers[k]`.
    pub workers: Vec<Slot>,
}

/// `solution[s]` is the worker owning subscription `s`, if any.
pub type Solution = Vec<Option<usize>>;

struct State<'a> {
    problem: &'a Problem,
    owner: Solution,
    load: Vec<u64>,
    owned: Vec<Vec<usize>>,
}

impl State<'_> {
    fn fits(&self, s: usize, k: usize) -> bool {
        let worker = &self.problem.workers[k];
        let sub = &self.problem.subscriptions[s];
        worker.chains.contains(&sub.chain)
            && (worker.capacity == 0 || self.load[k] + u64::from(sub.weight) <= u64::from(worker.capacity))
    }

    fn place(&mut self, s: usize, k: usize) {
        self.owner[s] = Some(k);
        self.load[k] += u64::from(self.problem.subscriptions[s].weight);
        self.owned[k].push(s);
    }

    fn remove(&mut self, s: usize, k: usize) {
        self.owner[s] = None;
        self.load[k] -= u64::from(self.problem.subscriptions[s].weight);
        let at = self.owned[k].iter().position(|x| *x == s).expect("owned subscription");
        self.owned[k].remove(at);
    }

    /// Places every unassigned subscription, in order, on the least loaded worker (lowest id
    /// on ties) that fits it. One lazy min-heap of (load, worker) per chain: loads only grow
    /// while placing, so a stale entry underestimates and is refreshed when popped.
    fn place_unassigned(&mut self) {
        let mut heaps: BTreeMap<u64, BinaryHeap<Reverse<(u64, usize)>>> = BTreeMap::new();
        for s in 0..self.problem.subscriptions.len() {
            if self.owner[s].is_some() {
                continue;
            }
            let chain = self.problem.subscriptions[s].chain;
            let heap = heaps.entry(chain).or_insert_with(|| {
                (0..self.load.len())
                    .filter(|&k| self.problem.workers[k].chains.contains(&chain))
                    .map(|k| Reverse((self.load[k], k)))
                    .collect()
            });
            let mut full = Vec::new();
            while let Some(Reverse((load, k))) = heap.pop() {
                if load != self.load[k] {
                    heap.push(Reverse((self.load[k], k)));
                } else if self.fits(s, k) {
                    self.owner[s] = Some(k);
                    self.load[k] += u64::from(self.problem.subscriptions[s].weight);
                    self.owned[k].push(s);
                    heap.push(Reverse((self.load[k], k)));
                    break;
                } else {
                    full.push(Reverse((load, k)));
                }
            }
            heap.extend(full);
        }
    }

    /// The best improving move, if any: from the most loaded worker that has one, the last
    /// subscription it can give to the least loaded eligible worker.
    fn best_move(&self) -> Option<(usize, usize, usize)> {
        let mut by_load_desc: Vec<usize> = (0..self.load.len()).collect();
        by_load_desc.sort_by(|a, b| self.load[*b].cmp(&self.load[*a]).then(a.cmp(b)));
        let mut by_load_asc = by_load_desc.clone();
        by_load_asc.sort_by(|a, b| self.load[*a].cmp(&self.load[*b]).then(a.cmp(b)));
        for &hi in &by_load_desc {
            for &lo in &by_load_asc {
                if self.load[lo] >= self.load[hi] {
                    break;
                }
                let gap = self.load[hi] - self.load[lo];
                let candidate = self.owned[hi].iter().rev().copied().find(|&s| {
                    let weight = u64::from(self.problem.subscriptions[s].weight);
                    gap > weight && self.fits(s, lo)
                });
                if let Some(s) = candidate {
                    return Some((s, hi, lo));
                }
            }
        }
        None
    }
}

/// Assigns subscriptions to workers; see the module README for the goals. Pure and
/// deterministic. `previous` may be shorter or longer than the problem; out-of-range workers
/// in it are ignored.
pub fn solve(problem: &Problem, previous: &[Option<usize>]) -> Solution {
    let workers = problem.workers.len();
    let mut state = State {
        problem,
        owner: vec![None; problem.subscriptions.len()],
        load: vec![0; workers],
        owned: vec![Vec::new(); workers],
    };
    // 1. Keep what is still valid.
    for s in 0..problem.subscriptions.len() {
        if let Some(k) = previous.get(s).copied().flatten().filter(|k| *k < workers)
            && state.fits(s, k)
        {
            state.place(s, k);
        }
    }
    loop {
        // 2. Place the rest on the least loaded eligible worker.
        state.place_unassigned();
        // 3. Improve balance one move at a time. A move can free capacity on a full worker,
        //    so placing is tried again until neither places nor moves anything.
        let mut moved = false;
        while let Some((s, hi, lo)) = state.best_move() {
            state.remove(s, hi);
            state.place(s, lo);
            moved = true;
        }
        let unplaced_fits = (0..problem.subscriptions.len())
            .any(|s| state.owner[s].is_none() && (0..workers).any(|k| state.fits(s, k)));
        if !moved || !unplaced_fits {
            break;
        }
    }
    debug_assert!(state.owner.iter().enumerate().all(|(s, k)| k.is_none_or(|k| state.owned[k].contains(&s))));
    state.owner
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn uniform(subscriptions: usize, workers: usize) -> Problem {
        Problem {
            subscriptions: vec![Load { chain: 1, weight: 1 }; subscriptions],
            workers: vec![Slot { chains: [1].into(), capacity: 0 }; workers],
        }
    }

    fn loads(problem: &Problem, solution: &Solution) -> Vec<u64> {
        let mut load = vec![0; problem.workers.len()];
        for (s, k) in solution.iter().enumerate() {
            if let Some(k) = k {
                load[*k] += u64::from(problem.subscriptions[s].weight);
            }
        }
        load
    }

    fn moved(a: &Solution, b: &Solution) -> usize {
        a.iter().zip(b).filter(|(x, y)| x.is_some() && x != y).count()
    }

    #[test]
    fn spreads_evenly_and_is_sticky() {
        let p = uniform(60, 3);
        let first = solve(&p, &[]);
        assert_eq!(loads(&p, &first), [20, 20, 20]);
        assert_eq!(solve(&p, &first), first);
    }

    #[test]
    fn a_join_moves_about_one_share() {
        let p = uniform(60, 3);
        let before = solve(&p, &[]);
        let after = solve(&uniform(60, 4), &before);
        assert_eq!(loads(&uniform(60, 4), &after), [15, 15, 15, 15]);
        assert_eq!(moved(&before, &after), 15);
    }

    #[test]
    fn a_leave_moves_only_the_leavers_subscriptions() {
        let p = uniform(60, 4);
        let before = solve(&p, &[]);
        // Worker 3 leaves: the problem has workers 0..3; its subscriptions lose their owner.
        let previous: Solution = before.iter().map(|k| k.filter(|k| *k < 3)).collect();
        let after = solve(&uniform(60, 3), &previous);
        assert_eq!(loads(&uniform(60, 3), &after), [20, 20, 20]);
        let kept_moved = previous.iter().zip(&after).filter(|(x, y)| x.is_some() && x != y).count();
        assert_eq!(kept_moved, 0);
    }

    #[test]
    fn chains_and_capacity_are_respected() {
        let p = Problem {
            subscriptions: vec![
                Load { chain: 1, weight: 1 },
                Load { chain: 2, weight: 1 },
                Load { chain: 3, weight: 1 },
                Load { chain: 1, weight: 1 },
            ],
            workers: vec![
                Slot { chains: [1].into(), capacity: 1 },
                Slot { chains: [1, 2].into(), capacity: 0 },
            ],
        };
        let s = solve(&p, &[]);
        assert_eq!(s[2], None, "no worker serves chain 3");
        assert_eq!(s[1], Some(1));
        assert_eq!(loads(&p, &s)[0], 1);
    }

    fn arb_problem() -> impl Strategy<Value = (Problem, Vec<Option<usize>>)> {
        (1usize..8, 0usize..120).prop_flat_map(|(workers, subs)| {
            let slots = proptest::collection::vec(
                (proptest::collection::btree_set(1u64..4, 1..4), prop_oneof![4 => Just(0u32), 1 => 1u32..40]),
                workers,
            );
            let loads = proptest::collection::vec((1u64..4, 1u32..4), subs);
            let previous = proptest::collection::vec(proptest::option::of(0usize..10), subs);
            (slots, loads, previous).prop_map(|(slots, loads, previous)| {
                let problem = Problem {
                    subscriptions: loads.into_iter().map(|(chain, weight)| Load { chain, weight }).collect(),
                    workers: slots.into_iter().map(|(chains, capacity)| Slot { chains, capacity }).collect(),
                };
                (problem, previous)
            })
        })
    }

    proptest! {
        #[test]
        fn every_goal_holds((p, previous) in arb_problem()) {
            let s = solve(&p, &previous);
            let load = loads(&p, &s);
            // Single owner, eligibility, capacity.
            for (i, k) in s.iter().enumerate() {
                if let Some(k) = k {
                    prop_assert!(p.workers[*k].chains.contains(&p.subscriptions[i].chain));
                }
            }
            for (k, w) in p.workers.iter().enumerate() {
                prop_assert!(w.capacity == 0 || load[k] <= u64::from(w.capacity));
            }
            // Coverage: an unassigned subscription has no worker with room for it.
            for (i, k) in s.iter().enumerate() {
                if k.is_none() {
                    let sub = &p.subscriptions[i];
                    prop_assert!(p.workers.iter().enumerate().all(|(k, w)| !w.chains.contains(&sub.chain)
                        || (w.capacity > 0 && load[k] + u64::from(sub.weight) > u64::from(w.capacity))));
                }
            }
            // Balance: no improving single move remains.
            for (i, k) in s.iter().enumerate() {
                let Some(hi) = *k else { continue };
                let sub = &p.subscriptions[i];
                for (lo, w) in p.workers.iter().enumerate() {
                    let fits = w.chains.contains(&sub.chain)
                        && (w.capacity == 0 || load[lo] + u64::from(sub.weight) <= u64::from(w.capacity));
                    prop_assert!(!(fits && load[hi] > load[lo] && load[hi] - load[lo] > u64::from(sub.weight)));
                }
            }
            // Fixed point and determinism.
            prop_assert_eq!(&solve(&p, &s), &s);
            prop_assert_eq!(&solve(&p, &previous), &s);
        }

        #[test]
        fn uniform_balance_and_join_movement(subs in 0usize..400, workers in 1usize..12) {
            let p = uniform(subs, workers);
            let before = solve(&p, &[]);
            let load = loads(&p, &before);
            prop_assert!(load.iter().max().unwrap() - load.iter().min().unwrap() <= 1);
            let joined = uniform(subs, workers + 1);
            let after = solve(&joined, &before);
            let bound = subs.div_ceil(workers + 1) + 1;
            prop_assert!(moved(&before, &after) <= bound, "moved {} > {}", moved(&before, &after), bound);
            let load = loads(&joined, &after);
            prop_assert!(load.iter().max().unwrap() - load.iter().min().unwrap() <= 1);
        }

        #[test]
        fn sticky_when_nothing_changed(subs in 0usize..200, workers in 1usize..8) {
            let p = uniform(subs, workers);
            let first = solve(&p, &[]);
            prop_assert_eq!(moved(&first, &solve(&p, &first)), 0);
        }
    }
}
