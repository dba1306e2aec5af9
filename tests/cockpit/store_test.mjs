//! The Cockpit page's mirror of the model (data/cockpit/devmgr/store.js)
//! on its own, under `node --test`: pages and signals applied in the bus's
//! order give the model, children follow their parent, removals drop
//! objects, and what a removal waits for is derived from the mirror. Run by
//! tests/tests/cockpit.rs.

import { test } from "node:test";
import assert from "node:assert/strict";
import { Store, OBJECTS_PREFIX, OBJECT_IFACE } from "../../data/cockpit/devmgr/store.js";

const v = (t, value) => ({ t, v: value });
const path = id => `${OBJECTS_PREFIX}${id}`;
function props(kind, name, parent = "/", extra = {}) {
    return { Kind: v("s", kind), Name: v("s", name), State: v("s", "live"), Parent: v("o", parent),
             Driver: v("o", "/"), RefCount: v("u", 0), Holders: v("a(tsuust)", []), Origin: v("s", "api"), ...extra };
}
const added = (id, p) => ["/org/devmgr/DevMgr1", "org.freedesktop.DBus.ObjectManager", "InterfacesAdded", [path(id), { [OBJECT_IFACE]: p }]];
const removed = id => ["/org/devmgr/DevMgr1", "org.freedesktop.DBus.ObjectManager", "InterfacesRemoved", [path(id), [OBJECT_IFACE]]];
const changed = (id, p) => [path(id), "org.freedesktop.DBus.Properties", "PropertiesChanged", [OBJECT_IFACE, p, []]];

test("a page and the signals around it give the model, in bus order", () => {
    const store = new Store();
    // A signal before the first page: the object is new to the mirror.
    store.signal(...added(5, props("device", "lun5", path(1))));
    store.page([[path(1), props("host", "host1")], [path(5), props("device", "lun5", path(1))]]);
    // One removed before the next page is not in it, and stays gone.
    store.signal(...added(9, props("device", "lun9", path(1))));
    store.signal(...removed(9));
    store.page([[path(7), props("device", "lun7", path(1))]]);
    assert.deepEqual([...store.objects.keys()].sort(), [path(1), path(5), path(7)].sort());
    assert.deepEqual(store.childrenOf(path(1)).map(r => r.name), ["lun5", "lun7"]);
    assert.deepEqual(store.childrenOf("/").map(r => r.name), ["host1"]);
});

test("property changes update the record, and a move changes the parent's children", () => {
    const store = new Store();
    store.page([[path(1), props("host", "a")], [path(2), props("host", "b")], [path(3), props("device", "d", path(1))]]);
    store.signal(...changed(3, { State: v("s", "removing"), Parent: v("o", path(2)) }));
    assert.equal(store.get(path(3)).state, "removing");
    assert.deepEqual(store.childrenOf(path(1)), []);
    assert.deepEqual(store.childrenOf(path(2)).map(r => r.name), ["d"]);
    // A change for an object the mirror does not have creates nothing.
    assert.equal(store.signal(...changed(99, { State: v("s", "live") })), false);
    assert.equal(store.get(path(99)), undefined);
});

test("what a pending removal waits for: holders, objects below, bound objects", () => {
    const store = new Store();
    const holder = [[7, ":1.42", 0, 4242, "nightly backup", 1]];
    store.page([
        [path(1), props("driver", "drv")],
        [path(2), { ...props("host", "h"), State: v("s", "removing"), Driver: v("o", path(1)) }],
        [path(3), { ...props("device", "l", path(2)), State: v("s", "removing"), RefCount: v("u", 1), Holders: v("a(tsuust)", holder) }],
    ]);
    assert.deepEqual(store.pending().map(r => r.name), ["h", "l"]);
    assert.deepEqual(store.waitingFor(path(2)).below.map(r => r.name), ["l"]);
    assert.equal(store.waitingFor(path(3)).holders[0].reason, "nightly backup");
    assert.deepEqual(store.waitingFor(path(1)).bound.map(r => r.name), ["h"]);
    store.signal("/org/devmgr/DevMgr1", "org.devmgr.DevMgr1.Manager", "RemovalCompleted", [path(3), "device", "l"]);
    assert.deepEqual(store.waitingFor(path(2)).below, []);
    assert.deepEqual(store.subtree(path(2)).map(r => r.name), ["h"]);
});
