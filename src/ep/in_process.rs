//! The in-process [`Communicator`]: N ranks as threads of one process, exchanging host buffers
//! through shared mailboxes. It is the test double of NCCL: the same collectives, the same
//! per-peer counts, checked on both sides (a count that disagrees with what the peer sent is
//! an error, where NCCL would corrupt memory or hang). Backends whose buffers live on a device
//! (wgpu, CUDA) stage through the host when they use it; that copy is part of the double, not
//! of the design (NCCL moves device buffers directly).
//!
//! A rank that fails calls [`InProcess::abort`] (a rank whose thread panics does so when its
//! communicator is dropped): every collective of every rank then returns [`Error::Ep`] instead
//! of waiting forever for the failed rank.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use crate::ep::comm::{check_counts, offsets, Communicator, Word};
use crate::error::{Error, Result};

/// One rank of an in-process world (see the module docs). `Send`: move each into its thread.
#[derive(Debug)]
pub struct InProcess {
    rank: usize,
    world: Arc<World>,
}

#[derive(Debug)]
struct World {
    size: usize,
    state: Mutex<State>,
    cv: Condvar,
}

#[derive(Debug)]
struct State {
    /// `[src · size + dst]`: what `src` sent to `dst` in the current collective.
    mail: Vec<Option<Mail>>,
    /// Ranks waiting in the current barrier.
    waiting: usize,
    /// Barriers completed so far.
    generation: u64,
    /// The first rank that aborted, and why.
    aborted: Option<(usize, String)>,
}

#[derive(Debug)]
struct Mail {
    kind: &'static str,
    elem: usize,
    bytes: Vec<u8>,
}

impl InProcess {
    /// A world of `size` ranks (at least 1): element `r` is rank `r`.
    pub fn world(size: usize) -> Result<Vec<InProcess>> {
        if size == 0 {
            return Err(Error::Ep {
                rank: 0,
                what: "a world needs at least one rank".into(),
            });
        }
        let world = Arc::new(World {
            size,
            state: Mutex::new(State {
                mail: (0..size * size).map(|_| None).collect(),
                waiting: 0,
                generation: 0,
                aborted: None,
            }),
            cv: Condvar::new(),
        });
        Ok((0..size)
            .map(|rank| InProcess {
                rank,
                world: world.clone(),
            })
            .collect())
    }

    /// Marks the world failed: every waiting and later collective of every rank returns an
    /// [`Error::Ep`] naming this rank and `why`. Only the first abort is kept.
    pub fn abort(&self, why: &str) {
        if let Ok(mut s) = self.world.state.lock() {
            if s.aborted.is_none() {
                s.aborted = Some((self.rank, why.to_string()));
            }
        }
        self.world.cv.notify_all();
    }

    /// The rank that aborted the world first and why, if any did.
    pub fn aborted(&self) -> Option<(usize, String)> {
        self.world.state.lock().ok().and_then(|s| s.aborted.clone())
    }

    fn lock(&self) -> Result<MutexGuard<'_, State>> {
        self.world.state.lock().map_err(|_| Error::Ep {
            rank: self.rank,
            what: "a rank panicked inside a collective".into(),
        })
    }

    fn aborted_err(&self, (who, why): &(usize, String)) -> Error {
        Error::Ep {
            rank: self.rank,
            what: format!("rank {who} aborted the world: {why}"),
        }
    }

    /// Aborts the world with `e`'s message and returns `e`.
    fn fail(&self, e: Error) -> Error {
        self.abort(&e.to_string());
        e
    }

    fn exchange<T: Word>(
        &self,
        send: &[T],
        send_counts: &[usize],
        recv: &mut [T],
        recv_counts: &[usize],
    ) -> Result<()> {
        let (me, size) = (self.rank, self.world.size);
        check_counts(me, size, "all_to_all_v send", send_counts, send.len())?;
        check_counts(me, size, "all_to_all_v recv", recv_counts, recv.len())?;
        let so = offsets(send_counts);
        {
            let mut s = self.lock()?;
            if let Some(a) = &s.aborted {
                return Err(self.aborted_err(a));
            }
            for p in 0..size {
                let chunk: &[u8] = bytemuck::cast_slice(&send[so[p]..so[p + 1]]);
                s.mail[me * size + p] = Some(Mail {
                    kind: T::NAME,
                    elem: std::mem::size_of::<T>(),
                    bytes: chunk.to_vec(),
                });
            }
        }
        self.barrier()?;
        let ro = offsets(recv_counts);
        {
            let mut s = self.lock()?;
            for p in 0..size {
                let Some(m) = s.mail[p * size + me].take() else {
                    return Err(Error::Ep {
                        rank: me,
                        what: format!("rank {p} sent nothing in this all_to_all_v"),
                    });
                };
                if m.kind != T::NAME {
                    return Err(Error::Ep {
                        rank: me,
                        what: format!(
                            "rank {p} sent {} elements, this rank receives {}",
                            m.kind,
                            T::NAME
                        ),
                    });
                }
                let n = m.bytes.len() / m.elem.max(1);
                if n != recv_counts[p] {
                    return Err(Error::Ep {
                        rank: me,
                        what: format!(
                            "rank {p} sent {n} {} elements, this rank expected {}",
                            T::NAME,
                            recv_counts[p]
                        ),
                    });
                }
                let dst: &mut [u8] = bytemuck::cast_slice_mut(&mut recv[ro[p]..ro[p + 1]]);
                dst.copy_from_slice(&m.bytes);
            }
        }
        // Nobody deposits the next collective's mail before everyone has taken this one's.
        self.barrier()
    }
}

impl Communicator for InProcess {
    type Buffer<T: Word> = [T];

    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world.size
    }

    fn all_to_all_v<T: Word>(
        &self,
        send: &[T],
        send_counts: &[usize],
        recv: &mut [T],
        recv_counts: &[usize],
    ) -> Result<()> {
        self.exchange(send, send_counts, recv, recv_counts)
            .map_err(|e| match e {
                // Already aborted by a peer: nothing to add.
                Error::Ep { ref what, .. } if what.contains("aborted the world") => e,
                e => self.fail(e),
            })
    }

    fn barrier(&self) -> Result<()> {
        let mut s = self.lock()?;
        if let Some(a) = &s.aborted {
            return Err(self.aborted_err(a));
        }
        s.waiting += 1;
        if s.waiting == self.world.size {
            s.waiting = 0;
            s.generation += 1;
            self.world.cv.notify_all();
            return Ok(());
        }
        let gen = s.generation;
        while s.generation == gen && s.aborted.is_none() {
            s = self.world.cv.wait(s).map_err(|_| Error::Ep {
                rank: self.rank,
                what: "a rank panicked inside a barrier".into(),
            })?;
        }
        match (&s.aborted, s.generation == gen) {
            (Some(a), true) => Err(self.aborted_err(a)),
            _ => Ok(()),
        }
    }
}

impl Drop for InProcess {
    /// A rank whose thread panics aborts the world, so its peers do not wait forever.
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.abort("its thread panicked");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_to_all_v_moves_counted_chunks_in_rank_order() {
        let comms = InProcess::world(3).unwrap();
        let out: Vec<Vec<u32>> = std::thread::scope(|s| {
            let hs: Vec<_> = comms
                .iter()
                .map(|c| {
                    s.spawn(move || {
                        let r = c.rank() as u32;
                        // Rank r sends p + 1 copies of 10·r + p to rank p.
                        let counts: Vec<usize> = (0..3).map(|p| p + 1).collect();
                        let send: Vec<u32> = (0..3u32)
                            .flat_map(|p| std::iter::repeat_n(10 * r + p, p as usize + 1))
                            .collect();
                        let recv_counts = vec![c.rank() + 1; 3];
                        let mut recv = vec![0u32; 3 * (c.rank() + 1)];
                        c.all_to_all_v(&send, &counts, &mut recv, &recv_counts)
                            .unwrap();
                        recv
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(out[0], vec![0, 10, 20]);
        assert_eq!(out[1], vec![1, 1, 11, 11, 21, 21]);
        assert_eq!(out[2], vec![2, 2, 2, 12, 12, 12, 22, 22, 22]);
    }

    #[test]
    fn a_count_mismatch_fails_every_rank() {
        let comms = InProcess::world(2).unwrap();
        let res: Vec<Result<()>> = std::thread::scope(|s| {
            let hs: Vec<_> = comms
                .iter()
                .map(|c| {
                    s.spawn(move || {
                        let send = [1u32, 2, 3];
                        // Rank 0 expects 2 elements from rank 1, which sends 1.
                        let (sc, rc) = if c.rank() == 0 {
                            (vec![1, 2], vec![1, 2])
                        } else {
                            (vec![2, 1], vec![1, 1])
                        };
                        let mut recv = [0u32; 3];
                        c.all_to_all_v(&send, &sc, &mut recv, &rc)?;
                        c.barrier()
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(res.iter().all(Result::is_err), "{res:?}");
        let msg = res[1].as_ref().unwrap_err().to_string();
        assert!(
            msg.contains("rank 0 sent 2 u32 elements, this rank expected 1"),
            "{msg}"
        );
        let msg = res[0].as_ref().unwrap_err().to_string();
        assert!(msg.contains("rank 1 aborted the world"), "{msg}");
    }

    #[test]
    fn a_world_of_zero_ranks_is_an_error() {
        assert!(InProcess::world(0).is_err());
    }
}
