//! Builders for hand-written histories and a reference etcd store for generated ones.
#![allow(dead_code)]

use std::collections::BTreeMap;

use metastore_checker::{
    EventType, Input, KeyValue, Operation, Outcome, Response, Revision, WatchEvent,
};

pub fn kv(
    value: &str,
    mod_revision: Revision,
    create_revision: Revision,
    version: i64,
) -> KeyValue {
    KeyValue {
        value: value.into(),
        mod_revision,
        create_revision,
        version,
        lease: 0,
    }
}

fn op(client: u64, call: u64, ret: u64, input: Input, response: Option<Response>) -> Operation {
    Operation {
        client,
        call,
        ret,
        input,
        outcome: response.map_or(Outcome::Unknown, Outcome::Ok),
    }
}

pub fn put(client: u64, call: u64, ret: u64, key: &str, value: &str, rev: Revision) -> Operation {
    let input = Input::Put {
        key: key.into(),
        value: value.into(),
        lease: 0,
    };
    op(
        client,
        call,
        ret,
        input,
        Some(Response::Put {
            header_revision: rev,
        }),
    )
}

pub fn put_unknown(client: u64, call: u64, key: &str, value: &str) -> Operation {
    let input = Input::Put {
        key: key.into(),
        value: value.into(),
        lease: 0,
    };
    op(client, call, 0, input, None)
}

fn get_op(
    client: u64,
    call: u64,
    ret: u64,
    key: &str,
    serializable: bool,
    header: Revision,
    kv: Option<KeyValue>,
) -> Operation {
    let input = Input::Get {
        key: key.into(),
        serializable,
    };
    op(
        client,
        call,
        ret,
        input,
        Some(Response::Get {
            header_revision: header,
            kv,
        }),
    )
}

pub fn get(
    client: u64,
    call: u64,
    ret: u64,
    key: &str,
    header: Revision,
    kv: Option<KeyValue>,
) -> Operation {
    get_op(client, call, ret, key, false, header, kv)
}

pub fn sget(
    client: u64,
    call: u64,
    ret: u64,
    key: &str,
    header: Revision,
    kv: Option<KeyValue>,
) -> Operation {
    get_op(client, call, ret, key, true, header, kv)
}

pub fn del(
    client: u64,
    call: u64,
    ret: u64,
    key: &str,
    header: Revision,
    deleted: i64,
) -> Operation {
    let input = Input::Delete { key: key.into() };
    op(
        client,
        call,
        ret,
        input,
        Some(Response::Delete {
            header_revision: header,
            deleted,
        }),
    )
}

#[allow(clippy::too_many_arguments)]
pub fn cas(
    client: u64,
    call: u64,
    ret: u64,
    key: &str,
    expected: Revision,
    value: &str,
    header: Revision,
    succeeded: bool,
    read: Option<KeyValue>,
) -> Operation {
    let input = Input::CasPut {
        key: key.into(),
        expected_mod_revision: expected,
        value: value.into(),
    };
    let response = Response::CasPut {
        header_revision: header,
        succeeded,
        kv: read,
    };
    op(client, call, ret, input, Some(response))
}

pub fn event(
    revision: Revision,
    key: &str,
    put: Option<KeyValue>,
    prev_kv: Option<KeyValue>,
) -> WatchEvent {
    let (kind, kv) = match put {
        Some(kv) => (EventType::Put, kv),
        None => (EventType::Delete, kv("", revision, 0, 0)),
    };
    WatchEvent {
        revision,
        key: key.into(),
        kind,
        kv: Some(kv),
        prev_kv,
    }
}

/// A sequential etcd store that keeps every revision, so stale reads can be served.
#[derive(Default)]
pub struct Reference {
    pub rev: Revision,
    /// Per key, its state after each change.
    history: BTreeMap<String, BTreeMap<Revision, Option<KeyValue>>>,
    pub events: Vec<WatchEvent>,
}

impl Reference {
    pub fn at(&self, key: &str, rev: Revision) -> Option<KeyValue> {
        self.history
            .get(key)
            .and_then(|h| h.range(..=rev).next_back())
            .and_then(|(_, kv)| kv.clone())
    }

    fn current(&self, key: &str) -> Option<KeyValue> {
        self.at(key, self.rev)
    }

    fn change(&mut self, key: &str, after: Option<KeyValue>) {
        self.rev += 1;
        let prev = self.current(key);
        let mut ev = event(self.rev, key, after.clone(), prev);
        if let (Some(kv), Some(a)) = (&mut ev.kv, &after) {
            kv.lease = a.lease;
        }
        self.events.push(ev);
        self.history
            .entry(key.into())
            .or_default()
            .insert(self.rev, after);
    }

    fn put(&mut self, key: &str, value: &str, lease: i64) {
        let (create, version) = self
            .current(key)
            .map_or((self.rev + 1, 1), |p| (p.create_revision, p.version + 1));
        let after = KeyValue {
            value: value.into(),
            mod_revision: self.rev + 1,
            create_revision: create,
            version,
            lease,
        };
        self.change(key, Some(after));
    }

    /// Executes `input` and returns etcd's response; `stale_by` picks how far behind a
    /// serializable read is served.
    pub fn apply(&mut self, input: &Input, stale_by: i64) -> Response {
        match input {
            Input::Put { key, value, lease } => {
                self.put(key, value, *lease);
                Response::Put {
                    header_revision: self.rev,
                }
            }
            Input::Get { key, serializable } => {
                let at = if *serializable {
                    (self.rev - stale_by).max(0)
                } else {
                    self.rev
                };
                Response::Get {
                    header_revision: at,
                    kv: self.at(key, at),
                }
            }
            Input::Delete { key } => {
                let deleted = i64::from(self.current(key).is_some());
                if deleted == 1 {
                    self.change(key, None);
                }
                Response::Delete {
                    header_revision: self.rev,
                    deleted,
                }
            }
            Input::CasPut {
                key,
                expected_mod_revision,
                value,
            } => {
                let current = self.current(key);
                if current.as_ref().map_or(0, |kv| kv.mod_revision) == *expected_mod_revision {
                    self.put(key, value, 0);
                    Response::CasPut {
                        header_revision: self.rev,
                        succeeded: true,
                        kv: None,
                    }
                } else {
                    Response::CasPut {
                        header_revision: self.rev,
                        succeeded: false,
                        kv: current,
                    }
                }
            }
            Input::LeaseGrant { .. } => Response::LeaseGrant {
                header_revision: self.rev,
            },
        }
    }

    pub fn mod_revision(&self, key: &str) -> Revision {
        self.current(key).map_or(0, |kv| kv.mod_revision)
    }
}
