//! Group commit for the audit log and the index: concurrent issuers append their lines to a
//! shared batch; one of them (the leader) writes and fsyncs the whole batch to both files while
//! the others wait. Every caller still returns only after its own lines are durable, but N
//! concurrent issuances cost two fsyncs instead of 2N.

use parking_lot::{Condvar, Mutex};
use serde::Serialize;

use crate::error::CaError;
use crate::journal::Journal;

struct State {
    audit_buf: Vec<u8>,
    index_buf: Vec<u8>,
    /// Sequence number of the last enqueued record pair.
    enqueued: u64,
    /// Every record pair up to this sequence number is durable.
    durable: u64,
    leader: bool,
    /// Batches that failed to persist: (first seq, last seq, error message).
    failed: Vec<(u64, u64, String)>,
    files: Option<(Journal, Journal)>,
}

pub(crate) struct GroupCommit {
    state: Mutex<State>,
    done: Condvar,
}

impl GroupCommit {
    /// `(audit, index)` journals.
    pub(crate) fn new(audit: Journal, index: Journal) -> Self {
        Self {
            state: Mutex::new(State {
                audit_buf: Vec::new(),
                index_buf: Vec::new(),
                enqueued: 0,
                durable: 0,
                leader: false,
                failed: Vec::new(),
                files: Some((audit, index)),
            }),
            done: Condvar::new(),
        }
    }

    /// Appends one audit record and one index record; returns once both are fsynced.
    pub(crate) fn append<A: Serialize, I: Serialize>(
        &self,
        audit: &A,
        index: &I,
    ) -> Result<(), CaError> {
        let mut a = serde_json::to_vec(audit).map_err(|e| CaError::Internal(e.to_string()))?;
        a.push(b'\n');
        let mut i = serde_json::to_vec(index).map_err(|e| CaError::Internal(e.to_string()))?;
        i.push(b'\n');
        let mut st = self.state.lock();
        st.audit_buf.extend_from_slice(&a);
        st.index_buf.extend_from_slice(&i);
        st.enqueued += 1;
        let me = st.enqueued;
        loop {
            if st.durable >= me {
                if let Some((_, _, msg)) =
                    st.failed.iter().find(|(lo, hi, _)| *lo <= me && me <= *hi)
                {
                    return Err(CaError::Internal(format!(
                        "persisting the issuance failed: {msg}"
                    )));
                }
                return Ok(());
            }
            if st.leader {
                self.done.wait(&mut st);
                continue;
            }
            // Become the leader for everything enqueued so far.
            st.leader = true;
            let lo = st.durable + 1;
            let hi = st.enqueued;
            let audit_buf = std::mem::take(&mut st.audit_buf);
            let index_buf = std::mem::take(&mut st.index_buf);
            let Some((mut audit_j, mut index_j)) = st.files.take() else {
                st.leader = false;
                return Err(CaError::Internal("journal unavailable".into()));
            };
            drop(st);
            // Audit first: a crash in between leaves an audited issuance that was never
            // returned, never a returned certificate without an audit line.
            let res = audit_j
                .write_raw(&audit_buf)
                .and_then(|()| index_j.write_raw(&index_buf));
            st = self.state.lock();
            st.files = Some((audit_j, index_j));
            if let Err(e) = res {
                st.failed.push((lo, hi, e.to_string()));
            }
            st.durable = hi;
            st.leader = false;
            self.done.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concurrent_appends_are_all_durable() {
        let dir = tempfile::tempdir().unwrap();
        let gc = GroupCommit::new(
            Journal::open(&dir.path().join("a")).unwrap(),
            Journal::open(&dir.path().join("i")).unwrap(),
        );
        std::thread::scope(|s| {
            for t in 0..8 {
                let gc = &gc;
                s.spawn(move || {
                    for n in 0..25 {
                        gc.append(
                            &serde_json::json!({"t": t, "n": n}),
                            &serde_json::json!({"n": n}),
                        )
                        .unwrap();
                    }
                });
            }
        });
        let a: Vec<serde_json::Value> = crate::journal::read_all(&dir.path().join("a")).unwrap();
        let i: Vec<serde_json::Value> = crate::journal::read_all(&dir.path().join("i")).unwrap();
        assert_eq!((a.len(), i.len()), (200, 200));
    }
}
