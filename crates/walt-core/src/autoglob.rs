//! The `compatibility` notation of WalT: a list of node models factored
//! into one glob (`pc-x86-64,pc-x86-32` → `pc-x86-[64|32]`,
//! `rpi-3-b,rpi-3-b-plus,rpi-4-b` → `rpi-[3-b[-plus]|4-b]`), as WalT's
//! `autoglob` computes it, so that what scripts parsed from WalT reads the
//! same here.
//!
//! WalT's algorithm: every character is a state of one graph shared by all
//! the words (a word is the path `START c1 c2 ... END`, each step a
//! numbered transition); states whose routes all go to one state absorb
//! it, repeatedly; the glob is then read from `START`, alternatives in
//! brackets when that is shorter than repeating the prefix. The result
//! depends on the order of the models, as in WalT.

use std::collections::HashMap;

const START: &str = "__START__";
const END: &str = "__END__";

/// The glob of `models` (`N/A` when there is none), as WalT prints it.
pub fn autoglob(models: &[String]) -> String {
    match models {
        [] => "N/A".to_string(),
        [one] => one.clone(),
        many => Graph::build(many)
            .and_then(|mut g| {
                g.simplify()?;
                g.glob(g.start, None)
            })
            // Only on inputs WalT itself would fail on: a plain list.
            .unwrap_or_else(|| many.join(",")),
    }
}

struct State {
    name: String,
    /// Transition number -> target state, in insertion order.
    routes: Vec<(i64, usize)>,
    ref_count: i64,
}

impl State {
    fn route(&self, t: i64) -> Option<usize> {
        self.routes.iter().find(|(k, _)| *k == t).map(|(_, s)| *s)
    }
}

struct Graph {
    states: Vec<State>,
    /// The live states by name, in order of first appearance.
    by_name: Vec<(String, usize)>,
    next: HashMap<i64, i64>,
    start: usize,
}

impl Graph {
    fn build(words: &[String]) -> Option<Graph> {
        let mut g = Graph {
            states: Vec::new(),
            by_name: Vec::new(),
            next: HashMap::new(),
            start: 0,
        };
        g.start = g.register(START);
        let mut transition: i64 = 0;
        let mut prev: Option<usize> = None;
        for word in words {
            let spelled = std::iter::once(START.to_string())
                .chain(word.chars().map(String::from))
                .chain(std::iter::once(END.to_string()));
            for name in spelled {
                let state = match g.by_name.iter().find(|(n, _)| *n == name) {
                    Some((_, s)) => *s,
                    None => g.register(&name),
                };
                if name != START {
                    let p = prev?;
                    let routes = &mut g.states[p].routes;
                    match routes.iter_mut().find(|(k, _)| *k == transition) {
                        Some(r) => r.1 = state,
                        None => routes.push((transition, state)),
                    }
                    g.next.insert(transition - 1, transition);
                    g.states[state].ref_count += 1;
                }
                prev = Some(state);
                transition += 1;
            }
        }
        Some(g)
    }

    fn register(&mut self, name: &str) -> usize {
        self.states.push(State {
            name: name.to_string(),
            routes: Vec::new(),
            ref_count: 0,
        });
        let id = self.states.len() - 1;
        match self.by_name.iter_mut().find(|(n, _)| n == name) {
            Some(entry) => entry.1 = id,
            None => self.by_name.push((name.to_string(), id)),
        }
        id
    }

    fn simplify(&mut self) -> Option<()> {
        loop {
            let mut changed = false;
            for (name, id) in self.by_name.clone() {
                let used = self.states[id].ref_count > 0 || self.states[id].name == START;
                if !used {
                    self.by_name.retain(|(n, _)| *n != name);
                    changed = true;
                }
                if self.simplify_state(id)? {
                    changed = true;
                }
            }
            if !changed {
                return Some(());
            }
        }
    }

    /// A state whose routes all lead to one state (not `END`) absorbs it.
    fn simplify_state(&mut self, id: usize) -> Option<bool> {
        let state = &self.states[id];
        if state.name == START || state.routes.is_empty() {
            return Some(false);
        }
        let target = state.routes[0].1;
        if state.routes.iter().any(|(_, s)| *s != target) || self.states[target].name == END {
            return Some(false);
        }
        let transitions: Vec<i64> = state.routes.iter().map(|(t, _)| *t).collect();
        for t in transitions {
            let nt = *self.next.get(&t)?;
            let to = self.states[target].route(nt)?;
            let r = self.states[id].routes.iter_mut().find(|(k, _)| *k == t)?;
            r.1 = to;
            let target_routes = &mut self.states[target].routes;
            let pos = target_routes.iter().position(|(k, _)| *k == nt)?;
            target_routes.remove(pos);
            self.states[target].ref_count -= 1;
            match self.next.get(&nt).copied() {
                None => {
                    self.next.remove(&t);
                }
                Some(nnt) => {
                    self.next.insert(t, nnt);
                    self.next.remove(&nt);
                }
            }
        }
        let suffix = self.states[target].name.clone();
        self.states[id].name.push_str(&suffix);
        Some(true)
    }

    /// The glob of the words going through `id` by the given transitions
    /// (all of its routes when `None`).
    fn glob(&self, id: usize, current: Option<&[Option<i64>]>) -> Option<String> {
        let state = &self.states[id];
        if state.name == END {
            return Some(String::new());
        }
        // Targets in order of first route, with the transitions leading there.
        let mut selected: Vec<(usize, Vec<i64>)> = Vec::new();
        for &(t, target) in &state.routes {
            if current.is_some_and(|c| !c.contains(&Some(t))) {
                continue;
            }
            match selected.iter_mut().find(|(s, _)| *s == target) {
                Some((_, ts)) => ts.push(t),
                None => selected.push((target, vec![t])),
            }
        }
        let mut globs = Vec::with_capacity(selected.len());
        for (target, ts) in &selected {
            let next: Vec<Option<i64>> = ts.iter().map(|t| self.next.get(t).copied()).collect();
            globs.push(self.glob(*target, Some(&next))?);
        }
        if state.name == START {
            return Some(globs.join(","));
        }
        // A value and nothing: the value is optional, `x[value]` not `x[|value]`.
        let optional = globs.len() == 2 && globs.iter().any(String::is_empty);
        let inside: Vec<&str> = globs
            .iter()
            .map(String::as_str)
            .filter(|g| !optional || !g.is_empty())
            .collect();
        let option1 = format!("{}[{}]", state.name, inside.join("|"));
        let option2 = globs
            .iter()
            .map(|g| format!("{}{g}", state.name))
            .collect::<Vec<_>>()
            .join(",");
        let (l1, l2) = (option1.chars().count(), option2.chars().count());
        Some(if l1 < l2 || (l1 == l2 && optional) {
            option1
        } else {
            option2
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn glob(models: &str) -> String {
        let models: Vec<String> = models.split(',').map(str::to_string).collect();
        autoglob(&models)
    }

    /// Expected values printed by WalT's own `autoglob.py` for the same inputs.
    #[test]
    fn same_globs_as_walt() {
        let cases = [
            ("pc-x86-64", "pc-x86-64"),
            ("pc-x86-64,pc-x86-32", "pc-x86-[64|32]"),
            ("pc-x86-32,pc-x86-64", "pc-x86-[32|64]"),
            ("rpi-3-b,rpi-3-b-plus,rpi-4-b", "rpi-[3-b[-plus]|4-b]"),
            (
                "rpi-b,rpi-b-plus,rpi-2-b,rpi-3-b,rpi-3-b-plus,rpi-4-b,rpi-400,rpi-5-b,qemu-arm-32,qemu-arm-64",
                "rpi-[b[-plus]|2-b|3-b[-plus]|4-b,400|5-b],qemu-arm-[32|64]",
            ),
            (
                "rpi-b,rpi-2-b,rpi-3-b,qemu-arm,pc-x86-64,pc-x86-32",
                "rpi-[b|2-b|3-b],qemu-arm,pc-x86-[64|32]",
            ),
            (
                "rpi-2-b,rpi-3-b,rpi-3-b-plus,rpi-4-b,qemu-arm-32",
                "rpi-[2-b|3-b[-plus]|4-b],qemu-arm-32",
            ),
            (
                "rpi-3-b,rpi-3-b-plus,rpi-4-b,rpi-400,rpi-5-b,qemu-arm-64",
                "rpi-[3-b[-plus]|4-b,400|5-b],qemu-arm-64",
            ),
            ("qemu-arm-32,qemu-arm-64", "qemu-arm-[32|64]"),
            ("rpi-b,rpi-b-plus", "rpi-b[-plus]"),
            ("rpi-4-b,pc-x86-64", "rpi-4-b,pc-x86-64"),
            ("a,b", "a,b"),
            ("ab,ab", "ab"),
            ("abc,abd,abe", "ab[c|d|e]"),
            ("rpi-3-b,rpi-4-b", "rpi-[3-b|4-b]"),
            ("rpi-b,rpi-b-plus,rpi-2-b", "rpi-[b[-plus]|2-b]"),
            (
                "pc-x86-64,pc-x86-32,qemu-arm-64",
                "pc-x86-[64|32],qemu-arm-64",
            ),
        ];
        for (input, want) in cases {
            assert_eq!(glob(input), want, "{input}");
        }
    }

    #[test]
    fn no_models_is_not_applicable() {
        assert_eq!(autoglob(&[]), "N/A");
    }
}
