//! Txns: their compares, the branch each level takes, the checks made before anything is
//! written, and their execution — applied (writes, with ranges bounded by the member's
//! response limit) or read-only (served locally).

use super::*;

impl<E: Engine> Store<E> {
    fn compare(&self, c: &Compare, view: &View<'_>) -> Result<bool> {
        let target =
            compare::CompareTarget::try_from(c.target).unwrap_or(compare::CompareTarget::Version);
        let req = RangeRequest {
            key: c.key.clone(),
            range_end: c.range_end.clone(),
            ..Default::default()
        };
        let kvs = self.range_in(&req, view)?.kvs;
        if kvs.is_empty() {
            // A value cannot be compared on a missing key: nil and "" look the same on the wire.
            if target == compare::CompareTarget::Value {
                return Ok(false);
            }
            return Ok(compare_kv(c, target, &KeyValue::default()));
        }
        Ok(kvs.iter().all(|kv| compare_kv(c, target, kv)))
    }

    /// Evaluates every compare of the transaction (nested ones too) against the state before
    /// it runs, as etcd does; returns the branch taken at each txn in depth-first order.
    fn txn_path(&self, t: &TxnRequest, view: &View<'_>, path: &mut Vec<bool>) -> Result<()> {
        let mut ok = true;
        for c in &t.compare {
            if !self.compare(c, view)? {
                ok = false;
                break;
            }
        }
        path.push(ok);
        for op in branch(t, ok) {
            if let Some(request_op::Request::RequestTxn(inner)) = &op.request {
                self.txn_path(inner, view, path)?;
            }
        }
        Ok(())
    }

    /// Checks the ops of the chosen branches before anything is written, so that a txn either
    /// applies whole or fails with nothing changed.
    fn txn_check(
        &self,
        t: &TxnRequest,
        path: &[bool],
        at: &mut usize,
        ctx: &WriteCtx,
    ) -> Result<()> {
        let ok = path[*at];
        *at += 1;
        let view = ctx.view();
        for op in branch(t, ok) {
            match &op.request {
                Some(request_op::Request::RequestRange(r)) => {
                    // etcd's txn check takes the requested revision literally: only 0 means
                    // "current", so a negative one below the compact revision is Compacted.
                    if r.revision == 0 {
                        continue;
                    }
                    if r.revision > view.current {
                        return Err(MvccError::FutureRev);
                    }
                    if r.revision < self.compact_revision().max(view.compact_floor) {
                        return Err(MvccError::Compacted);
                    }
                }
                Some(request_op::Request::RequestPut(p)) => self.check_put(p, ctx.rev, true)?,
                Some(request_op::Request::RequestTxn(inner)) => {
                    self.txn_check(inner, path, at, ctx)?
                }
                Some(request_op::Request::RequestDeleteRange(_)) | None => {}
            }
        }
        Ok(())
    }

    /// A range of a Txn that writes, answered in the apply step and bounded as a read-only
    /// one is. Past the limit it loads nothing more and the rest of the txn still executes:
    /// every member must write the same whatever its own limit, so the limit may only change
    /// this member's answer (`response_over`, turned into the command's error), as etcd's
    /// txn applies and then fails to send an answer too large.
    fn txn_range(&self, r: &RangeRequest, ctx: &mut WriteCtx) -> Result<RangeResponse> {
        if ctx.response_over.is_some() {
            return Ok(RangeResponse::default());
        }
        let limit = self.apply_response_limit.load(Ordering::Relaxed);
        let mut used = ctx.response_bytes;
        match self.range_in_bounded(r, &ctx.view(), limit, &mut used) {
            Ok(resp) => {
                ctx.response_bytes = used;
                Ok(resp)
            }
            Err(too_large @ MvccError::ResponseTooLarge { .. }) => {
                ctx.response_over = Some(too_large);
                Ok(RangeResponse::default())
            }
            Err(e) => Err(e),
        }
    }

    /// Executes the chosen branches. As etcd: each op's header carries the revision it saw
    /// (ranges: the one read at; writes: the txn's revision once it has changed something),
    /// nested txns get an empty header, and only the outer one gets the final revision.
    fn txn_exec(
        &self,
        t: &TxnRequest,
        path: &[bool],
        at: &mut usize,
        ctx: &mut WriteCtx,
    ) -> Result<TxnResponse> {
        let ok = path[*at];
        *at += 1;
        let mut responses = Vec::new();
        for op in branch(t, ok) {
            let response = match &op.request {
                Some(request_op::Request::RequestRange(r)) => {
                    response_op::Response::ResponseRange(self.txn_range(r, ctx)?)
                }
                Some(request_op::Request::RequestPut(p)) => {
                    let prev_kv = self.put(p, ctx)?;
                    response_op::Response::ResponsePut(PutResponse {
                        header: header(ctx.main),
                        prev_kv,
                    })
                }
                Some(request_op::Request::RequestDeleteRange(d)) => {
                    let (deleted, prev_kvs) = self.delete_range(d, ctx)?;
                    response_op::Response::ResponseDeleteRange(DeleteRangeResponse {
                        header: header(ctx.read_rev()),
                        deleted,
                        prev_kvs,
                    })
                }
                Some(request_op::Request::RequestTxn(inner)) => {
                    response_op::Response::ResponseTxn(self.txn_exec(inner, path, at, ctx)?)
                }
                None => continue,
            };
            responses.push(ResponseOp {
                response: Some(response),
            });
        }
        Ok(TxnResponse {
            header: Some(ResponseHeader::default()),
            succeeded: ok,
            responses,
        })
    }

    pub(super) fn txn(&self, t: &TxnRequest, ctx: &mut WriteCtx) -> Result<TxnResponse> {
        let mut path = Vec::new();
        self.txn_path(t, &ctx.view(), &mut path)?;
        self.txn_check(t, &path, &mut 0, ctx)?;
        let mut resp = self.txn_exec(t, &path, &mut 0, ctx)?;
        resp.header = header(ctx.rev_after());
        Ok(resp)
    }

    /// etcd's `IsTxnReadonly`: every op of both branches is a range (a nested txn counts as a
    /// write, whatever it holds).
    pub fn txn_is_read_only(t: &TxnRequest) -> bool {
        t.success
            .iter()
            .chain(t.failure.iter())
            .all(|op| matches!(op.request, Some(request_op::Request::RequestRange(_))))
    }

    /// Runs a read-only txn locally (serializable view at the current revision).
    pub fn read_txn(&self, t: &TxnRequest) -> Result<TxnResponse> {
        self.read_txn_bounded(t, usize::MAX)
    }

    /// `read_txn`, refused with `ResponseTooLarge` once the key-values of all its ranges
    /// together pass `max_bytes` (see `range_bounded`).
    pub fn read_txn_bounded(&self, t: &TxnRequest, max_bytes: usize) -> Result<TxnResponse> {
        let _gate = self.install_gate.read();
        at_current(true, || {
            let view = View::at(self.current_revision());
            let mut path = Vec::new();
            self.txn_path(t, &view, &mut path)?;
            let mut at = 0;
            let mut used = 0;
            let mut resp = self.read_txn_exec(t, &path, &mut at, &view, max_bytes, &mut used)?;
            resp.header = header(view.current);
            Ok(resp)
        })
    }

    fn read_txn_exec(
        &self,
        t: &TxnRequest,
        path: &[bool],
        at: &mut usize,
        view: &View<'_>,
        max_bytes: usize,
        used: &mut usize,
    ) -> Result<TxnResponse> {
        let ok = path[*at];
        *at += 1;
        let mut responses = Vec::new();
        for op in branch(t, ok) {
            let response = match &op.request {
                Some(request_op::Request::RequestRange(r)) => response_op::Response::ResponseRange(
                    self.range_in_bounded(r, view, max_bytes, used)?,
                ),
                Some(request_op::Request::RequestTxn(inner)) => response_op::Response::ResponseTxn(
                    self.read_txn_exec(inner, path, at, view, max_bytes, used)?,
                ),
                _ => continue,
            };
            responses.push(ResponseOp {
                response: Some(response),
            });
        }
        Ok(TxnResponse {
            header: Some(ResponseHeader::default()),
            succeeded: ok,
            responses,
        })
    }
}

fn branch(t: &TxnRequest, ok: bool) -> &[RequestOp] {
    if ok {
        &t.success
    } else {
        &t.failure
    }
}

fn compare_kv(c: &Compare, target: compare::CompareTarget, kv: &KeyValue) -> bool {
    use compare::TargetUnion;
    let ord = match target {
        compare::CompareTarget::Value => {
            let want: &[u8] = match &c.target_union {
                Some(TargetUnion::Value(v)) => v,
                _ => &[],
            };
            kv.value[..].cmp(want)
        }
        compare::CompareTarget::Version => kv.version.cmp(&int_target(c, |u| match u {
            TargetUnion::Version(v) => Some(*v),
            _ => None,
        })),
        compare::CompareTarget::Create => kv.create_revision.cmp(&int_target(c, |u| match u {
            TargetUnion::CreateRevision(v) => Some(*v),
            _ => None,
        })),
        compare::CompareTarget::Mod => kv.mod_revision.cmp(&int_target(c, |u| match u {
            TargetUnion::ModRevision(v) => Some(*v),
            _ => None,
        })),
        compare::CompareTarget::Lease => kv.lease.cmp(&int_target(c, |u| match u {
            TargetUnion::Lease(v) => Some(*v),
            _ => None,
        })),
    };
    match compare::CompareResult::try_from(c.result) {
        Ok(compare::CompareResult::Equal) => ord == CmpOrdering::Equal,
        Ok(compare::CompareResult::NotEqual) => ord != CmpOrdering::Equal,
        Ok(compare::CompareResult::Greater) => ord == CmpOrdering::Greater,
        Ok(compare::CompareResult::Less) => ord == CmpOrdering::Less,
        // etcd's compareKV falls through to true for a result it does not know.
        Err(_) => true,
    }
}

fn int_target(c: &Compare, pick: impl Fn(&compare::TargetUnion) -> Option<i64>) -> i64 {
    c.target_union.as_ref().and_then(pick).unwrap_or(0)
}
