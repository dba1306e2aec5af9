//! The page's mirror of devmgrd's model: objects by path, their children
//! and bindings, kept from ListObjects pages and the ObjectManager and
//! PropertiesChanged signals, applied in the order the bus delivers them
//! (a page reflects every signal sent before it: docs/contract.md). Pure:
//! no DOM and no cockpit here, so node tests it on its own
//! (tests/cockpit/store_test.mjs).

export const MANAGER_PATH = "/org/devmgr/DevMgr1";
export const OBJECTS_PREFIX = "/org/devmgr/DevMgr1/objects/";
export const OBJECT_IFACE = "org.devmgr.DevMgr1.Object";
export const MANAGER_IFACE = "org.devmgr.DevMgr1.Manager";

const KIND_ORDER = { driver: 0, host: 1, device: 2 };

/// The value of a cockpit variant ({t, v}), or the value itself.
function plain(value) {
    return value !== null && typeof value === "object" && "t" in value && "v" in value ? value.v : value;
}

/// One `Holders` entry (a(tsuust)) as an object.
function holderOf(tuple) {
    const [id, holder, uid, pid, reason, since] = tuple;
    return { id, holder, uid, pid, reason, since };
}

/// Property name on the bus → field of a record, and how to read it.
const FIELDS = {
    Id: ["id", Number],
    Kind: ["kind", String],
    Name: ["name", String],
    State: ["state", String],
    Parent: ["parent", String],
    Driver: ["driver", String],
    RefCount: ["refCount", Number],
    Holders: ["holders", list => (list || []).map(holderOf)],
    // null until read: the listing leaves Attributes, Subsystem and SysPath
    // out; InterfacesAdded and GetAll carry them.
    Attributes: ["attributes", map => ({ ...(map || {}) })],
    Origin: ["origin", String],
    Subsystem: ["subsystem", String],
    SysPath: ["sysPath", String],
    LastError: ["lastError", String],
    Scoped: ["scoped", Boolean],
};

function emptyRecord(path) {
    const tail = path.startsWith(OBJECTS_PREFIX) ? path.slice(OBJECTS_PREFIX.length) : "0";
    return {
        path,
        id: Number(tail) || 0,
        kind: "device",
        name: tail,
        state: "live",
        parent: "/",
        driver: "/",
        refCount: 0,
        holders: [],
        attributes: null,
        origin: "api",
        subsystem: "",
        sysPath: "",
        lastError: "",
        scoped: false,
    };
}

function byKindThenId(a, b) {
    return (KIND_ORDER[a.kind] ?? 3) - (KIND_ORDER[b.kind] ?? 3) || a.id - b.id;
}

export class Store {
    constructor() {
        this.objects = new Map(); // path → record
        this.children = new Map(); // parent path ("/" for the roots) → Set of paths
        this.bound = new Map(); // driver path → Set of paths bound to it
        this.sorted = new Map(); // parent path → its children sorted (dropped on change)
        this.structure = 0; // bumped when an object comes, goes or moves
        this.changed = new Set(); // paths whose properties changed since take()
    }

    clear() {
        this.objects.clear();
        this.children.clear();
        this.bound.clear();
        this.sorted.clear();
        this.structure++;
        this.changed.clear();
    }

    link(index, key, path) {
        let set = index.get(key);
        if (!set) index.set(key, (set = new Set()));
        set.add(path);
    }

    unlink(index, key, path) {
        const set = index.get(key);
        if (set) {
            set.delete(path);
            if (set.size === 0) index.delete(key);
        }
    }

    /// Sets properties of `path` (a bus dictionary, variants or plain),
    /// creating the object if it is new. Returns its record.
    apply(path, props) {
        let record = this.objects.get(path);
        const isNew = !record;
        if (isNew) record = emptyRecord(path);
        const oldParent = record.parent;
        const oldDriver = record.driver;
        for (const [name, value] of Object.entries(props || {})) {
            const field = FIELDS[name];
            if (field) record[field[0]] = field[1](plain(value));
        }
        if (isNew) {
            this.objects.set(path, record);
            this.link(this.children, record.parent, path);
            if (record.driver !== "/") this.link(this.bound, record.driver, path);
            this.sorted.delete(record.parent);
            this.structure++;
        } else {
            if (oldParent !== record.parent) {
                this.unlink(this.children, oldParent, path);
                this.link(this.children, record.parent, path);
                this.sorted.delete(oldParent);
                this.sorted.delete(record.parent);
                this.structure++;
            }
            if (oldDriver !== record.driver) {
                if (oldDriver !== "/") this.unlink(this.bound, oldDriver, path);
                if (record.driver !== "/") this.link(this.bound, record.driver, path);
            }
        }
        record.rev = (record.rev || 0) + 1;
        this.changed.add(path);
        return record;
    }

    /// An object went (InterfacesRemoved, RemovalCompleted).
    remove(path) {
        const record = this.objects.get(path);
        if (!record) return;
        this.objects.delete(path);
        this.unlink(this.children, record.parent, path);
        if (record.driver !== "/") this.unlink(this.bound, record.driver, path);
        this.sorted.delete(record.parent);
        this.structure++;
        this.changed.add(path);
    }

    /// One signal, as cockpit's client.subscribe hands it over. Returns
    /// whether it changed anything.
    signal(path, iface, member, args) {
        if (iface === "org.freedesktop.DBus.ObjectManager" && member === "InterfacesAdded") {
            const [object, interfaces] = args;
            const props = interfaces && interfaces[OBJECT_IFACE];
            if (!props) return false;
            this.apply(object, props);
        } else if (iface === "org.freedesktop.DBus.ObjectManager" && member === "InterfacesRemoved") {
            const [object, interfaces] = args;
            if (!(interfaces || []).includes(OBJECT_IFACE)) return false;
            this.remove(object);
        } else if (iface === MANAGER_IFACE && member === "RemovalCompleted") {
            this.remove(args[0]);
        } else if (iface === "org.freedesktop.DBus.Properties" && member === "PropertiesChanged") {
            const [changedIface, values] = args;
            if (changedIface !== OBJECT_IFACE || !this.objects.has(path)) return false;
            this.apply(path, values);
        } else {
            return false;
        }
        return true;
    }

    /// One ListObjects page: entries [path, properties].
    page(entries) {
        for (const [path, props] of entries) this.apply(path, props);
    }

    /// The paths whose properties changed since the last call.
    take() {
        const changed = this.changed;
        this.changed = new Set();
        return changed;
    }

    get(path) {
        return this.objects.get(path);
    }

    /// The children of `parent` ("/" for the roots: drivers first, then
    /// hosts and devices), in the order they were added.
    childrenOf(parent) {
        let list = this.sorted.get(parent);
        if (!list) {
            const set = this.children.get(parent);
            list = set ? [...set].map(p => this.objects.get(p)).sort(byKindThenId) : [];
            this.sorted.set(parent, list);
        }
        return list;
    }

    /// `path` and everything below it, parents first.
    subtree(path) {
        const out = [];
        const stack = [path];
        while (stack.length) {
            const next = stack.pop();
            const record = this.objects.get(next);
            if (!record) continue;
            out.push(record);
            const below = this.childrenOf(next);
            for (let i = below.length - 1; i >= 0; i--) stack.push(below[i].path);
        }
        return out;
    }

    /// Names from the root down to `path`'s parent.
    ancestors(path) {
        const out = [];
        let record = this.objects.get(path);
        while (record && record.parent !== "/" && out.length < 64) {
            record = this.objects.get(record.parent);
            if (record) out.unshift(record);
        }
        return out;
    }

    /// What keeps `path` from going (DESIGN.md §2: "idle" is no
    /// references, no children, nothing bound): its holders, the objects
    /// still below it and, for a driver, those still bound to it.
    waitingFor(path) {
        const record = this.objects.get(path);
        if (!record) return { holders: [], below: [], bound: [] };
        const below = this.childrenOf(path);
        const bound = record.kind === "driver" ? [...(this.bound.get(path) || [])].map(p => this.objects.get(p)) : [];
        return { holders: record.holders, refCount: record.refCount, below, bound };
    }

    /// The removing objects, oldest first.
    pending() {
        const out = [];
        for (const record of this.objects.values()) if (record.state === "removing") out.push(record);
        return out.sort((a, b) => a.id - b.id);
    }

    counts() {
        const counts = { objects: this.objects.size, removing: 0, references: 0, machine: 0 };
        for (const record of this.objects.values()) {
            if (record.state === "removing") counts.removing++;
            if (record.origin === "udev") counts.machine++;
            counts.references += record.refCount;
        }
        return counts;
    }

    /// The name people must use for `record` (rule 20: `udev:host0` when an
    /// API object has the same kind and name).
    displayName(record) {
        if (!record) return "";
        return record.scoped ? `${record.origin}:${record.name}` : record.name;
    }
}
