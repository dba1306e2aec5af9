//! devmgr's Cockpit page: connects to devmgrd on the system bus through
//! cockpit.js, mirrors its model (ListObjects pages, then ObjectManager and
//! PropertiesChanged signals: no polling), and draws the tree, the holders
//! and the pending removals, redrawn at most once a frame however many
//! signals arrive. What the user may change comes from devmgrd's own
//! GetPermissions; without rights the page is read-only.

import { Store, MANAGER_PATH, MANAGER_IFACE } from "./store.js";
import { TreeView } from "./tree.js";
import { renderDetails, renderPending } from "./panels.js";
import { removeDialog, addHostDialog } from "./dialogs.js";
import { h, alert, errorBody } from "./dom.js";
import { describeError, plural } from "./format.js";

const BUS_NAME = "org.devmgr.DevMgr1";
/// Objects asked for in the first ListObjects page (drawn at once, so the
/// tree appears while the rest is read) and in each next page (devmgrd's
/// most: cockpit-bridge's cost is per property, the page count matters
/// little).
const FIRST_PAGE = 1000;
const PAGE = 10000;
/// The properties the tree needs. cockpit-bridge's cost is per property
/// (docs/cockpit.md): the rest (Attributes, Subsystem, SysPath), shown only
/// in the details panel, is read when an object is selected.
const LISTED = ["Kind", "Name", "State", "Parent", "Driver", "RefCount", "Holders", "Origin", "LastError"];

const $ = id => document.getElementById(id);

/// A D-Bus call as a native promise (cockpit's own promises do not catch
/// an exception thrown in a handler).
function call(path, iface, method, args, type) {
    return new Promise((resolve, reject) => client.call(path, iface, method, args, { type }).then(resolve, reject));
}

const store = new Store();
const processes = new Map(); // pid → process name (or "" while asked)
let client = null;
let permissions = null; // verb → "yes" | "challenge" | "no"; null: unknown
let generation = 0; // bumped at every (re)connection
let selected = null;
let frame = 0;
let detailsDirty = true;
let firstRender = null;

// Timings the browser test reads: milliseconds since the page's navigation
// began (performance.now()).
window.devmgrTimings = { script: performance.now(), connected: null, listed: null, rendered: null, objects: 0, pages: [] };

function processOf(pid) {
    if (!pid) return "";
    const known = processes.get(pid);
    if (known !== undefined) return known;
    processes.set(pid, "");
    cockpit.file(`/proc/${pid}/comm`).read()
        .then(text => {
            processes.set(pid, (text || "").trim());
            // Redraw what names this process.
            for (const record of store.objects.values()) {
                if (record.holders.some(holder => holder.pid === pid)) store.changed.add(record.path);
            }
            detailsDirty = true;
            schedule();
        })
        .catch(() => processes.set(pid, ""));
    return "";
}

function can(verb) {
    if (permissions === null) return { ok: true };
    const answer = permissions[verb];
    if (answer === "yes" || answer === "challenge") return { ok: true };
    return { ok: false, why: `devmgrd does not authorize you to ${verb} (org.devmgr.DevMgr1.${verb}): turn on administrative access, or ask an administrator for the polkit action` };
}

const tree = new TreeView(store, $("tree"), $("tree-scroll"), { onSelect: select, processOf });

function select(path) {
    if (path) {
        selected = path;
        tree.select(path);
    }
    detailsDirty = true;
    schedule();
}

/// Page-level messages (results of actions); `body` is text or a node.
function notify(variant, title, body) {
    const content = typeof body === "string" ? (body ? h("p", null, body) : null) : body;
    const box = alert(variant, title, content, () => box.remove());
    $("alerts").append(box);
    if (variant === "success" || variant === "info") setTimeout(() => box.remove(), 8000);
    return box;
}

function notifyError(err, verb, what) {
    const d = describeError(err, verb);
    notify("danger", `${what}: ${d.title}`, errorBody(d));
}

/// Reads every property of an object (the listing left some out) for its
/// panel.
const asked = new Set();
function loadAll(path) {
    if (asked.has(path)) return;
    asked.add(path);
    call(path, "org.freedesktop.DBus.Properties", "GetAll", ["org.devmgr.DevMgr1.Object"], "s")
        .then(([values]) => {
            if (store.get(path)) {
                store.apply(path, values);
                detailsDirty = true;
                schedule();
            }
        })
        .catch(() => {}) // gone meanwhile: its removal redraws the panel
        .finally(() => asked.delete(path));
}

const ctx = {
    store,
    loadAll,
    processOf,
    can,
    select,
    notify,
    call,
    act: {
        remove: path => removeDialog(ctx, path),
        stop: path => simple(path, "Stop", "stop"),
        reenable: path => simple(path, "Reenable", "reenable"),
    },
};

function simple(path, method, verb) {
    const record = store.get(path);
    const name = record ? store.displayName(record) : path;
    call(path, "org.devmgr.DevMgr1.Object", method, [{}], "a{sv}")
        .then(() => notify("success", `${name}: ${method === "Stop" ? "stopped" : "re-enabled"}`))
        .catch(err => notifyError(err, verb, `${method} ${name}`));
}

function schedule() {
    if (!frame) frame = requestAnimationFrame(render);
}

function render() {
    frame = 0;
    const changed = store.take();
    tree.render(changed);
    if (detailsDirty || (selected && changed.has(selected)) || changed.size) {
        // The selected object's panel depends on its children and holders too:
        // redraw it on any change (one object's panel is cheap).
        renderDetails($("details"), selected, ctx);
        detailsDirty = false;
    }
    renderPending($("pending"), $("pending-list"), $("pending-title"), ctx);
    const counts = store.counts();
    $("summary").textContent = `${plural(counts.objects, "object")} (${counts.machine.toLocaleString("en")} of this machine) · ` +
        `${plural(counts.removing, "pending removal")} · ${plural(counts.references, "reference")}` +
        (document.body.dataset.state === "loading" ? " · reading the rest…" : "");
    $("shown").textContent = tree.visibleCount === counts.objects ? "" : `${tree.visibleCount.toLocaleString("en")} shown`;
    const empty = store.objects.size === 0 && document.body.dataset.state === "ready";
    if (empty) {
        $("empty-title").textContent = "No objects";
        $("empty-body").textContent = "devmgrd models nothing yet.";
    }
    $("empty").hidden = !empty && document.body.dataset.state !== "error";
    if (firstRender && document.body.dataset.state === "ready") {
        firstRender();
        firstRender = null;
    }
}

function showReadOnly() {
    const can_change = ["add", "remove", "stop", "reenable"].some(v => can(v).ok);
    $("add-host").disabled = !can("add").ok;
    $("add-host").title = can("add").ok ? "" : can("add").why;
    for (const old of $("alerts").querySelectorAll('[data-key="read-only"]')) old.remove();
    if (!can_change) {
        const box = alert("info", "Read-only: you can see everything but change nothing",
            h("p", null, "devmgrd does not authorize you to add, remove, stop or re-enable objects. " +
                "Turn on administrative access (Cockpit's \u201cLimited access\u201d button), or ask an " +
                "administrator to grant you the polkit actions org.devmgr.DevMgr1.* or membership of devmgrd's authorized group."));
        box.dataset.key = "read-only";
        box.id = "read-only";
        $("alerts").prepend(box);
    }
}

function fail(err) {
    const d = describeError(err);
    document.body.dataset.state = "error";
    $("empty-title").textContent = d.name === "org.freedesktop.DBus.Error.ServiceUnknown" || d.name === "not-found"
        ? "devmgrd is not running"
        : `Cannot read devmgrd's objects: ${d.title}`;
    $("empty-body").replaceChildren(errorBody(d));
    $("empty").hidden = false;
    $("summary").textContent = "Not connected";
}

/// Reads everything again: at start, when devmgrd (re)starts (its ids are
/// new), and when administrative access changes.
async function load() {
    const mine = ++generation;
    document.body.dataset.state = "loading";
    window.devmgrTimings.pages = [];
    store.clear();
    selected = null;
    detailsDirty = true;
    try {
        const [answer] = await call(MANAGER_PATH, MANAGER_IFACE, "GetPermissions", [], "")
            .catch(err => {
                // An older devmgrd has no GetPermissions: offer everything and
                // let devmgrd's answer to each call say.
                if (err.name === "org.freedesktop.DBus.Error.UnknownMethod") return [null];
                throw err;
            });
        if (mine !== generation) return;
        permissions = answer;
        window.devmgrTimings.connected = performance.now();
        let cursor = "";
        do {
            const limit = cursor ? PAGE : FIRST_PAGE;
            const query = { limit: cockpit.variant("u", limit), properties: cockpit.variant("as", LISTED) };
            if (cursor) query.cursor = cockpit.variant("s", cursor);
            const asked = performance.now();
            const [page, next] = await call(MANAGER_PATH, MANAGER_IFACE, "ListObjects", [query], "a{sv}");
            if (mine !== generation) return;
            const answered = performance.now();
            store.page(page);
            window.devmgrTimings.pages.push({ objects: page.length, wait: answered - asked, apply: performance.now() - answered });
            if (cursor === "") {
                window.devmgrTimings.first = performance.now();
                schedule();
            }
            cursor = next;
        } while (cursor);
        window.devmgrTimings.listed = performance.now();
        document.body.dataset.state = "ready";
        showReadOnly();
        firstRender = () => {
            window.devmgrTimings.rendered = performance.now();
            window.devmgrTimings.objects = store.objects.size;
            document.body.dataset.rendered = String(store.objects.size);
        };
        schedule();
    } catch (err) {
        if (mine === generation) fail(err);
    }
}

function connect() {
    if (client) client.close();
    client = cockpit.dbus(BUS_NAME, { bus: "system", superuser: "try" });
    // Signals first, then the listing: both come over this one channel in
    // the bus's order, and every page reflects the signals sent before it.
    client.subscribe({ path_namespace: MANAGER_PATH }, (path, iface, member, args) => {
        if (document.body.dataset.state === "error") return;
        if (store.signal(path, iface, member, args)) schedule();
    });
    let owner; // undefined until the bridge first says who owns the name
    client.addEventListener("owner", (_event, now) => {
        const before = owner;
        owner = now;
        if (!now) {
            // Not running (yet: the listing's first call may start it).
            if (before) fail({ name: "org.freedesktop.DBus.Error.ServiceUnknown", message: "devmgrd left the system bus." });
            return;
        }
        // devmgrd restarted, or was started by this page's first call: its
        // ids are new. The first owner seen is the one load() is reading.
        if (before !== undefined && before !== now) load();
    });
    client.addEventListener("close", (_event, options) => {
        if (options && options.problem) fail({ problem: options.problem, message: cockpit.message(options) });
    });
    load();
}

function init() {
    $("search").addEventListener("input", event => {
        tree.setQuery(event.target.value);
        schedule();
    });
    for (const toggle of $("show").querySelectorAll("button")) {
        toggle.addEventListener("click", () => {
            for (const other of $("show").querySelectorAll("button")) other.classList.toggle("pf-m-selected", other === toggle);
            tree.setShow(toggle.dataset.show);
            schedule();
        });
    }
    $("tree-scroll").addEventListener("scroll", schedule, { passive: true });
    window.addEventListener("resize", schedule);
    $("expand-all").addEventListener("click", () => { tree.expandAll(); schedule(); });
    $("collapse-all").addEventListener("click", () => { tree.collapseAll(); schedule(); });
    $("add-host").addEventListener("click", () => addHostDialog(ctx));
    // Ages in the holders panel move on with the clock (no bus traffic).
    setInterval(() => { if (selected) { detailsDirty = true; schedule(); } }, 15000);
    // Administrative access switched on or off: the bus connection is made
    // anew with the other rights, so read everything again.
    const superuser = cockpit.dbus(null, { bus: "internal" }).proxy("cockpit.Superuser", "/superuser");
    let current = null;
    superuser.addEventListener("changed", () => {
        if (current !== null && superuser.Current !== current && superuser.Current !== "init") connect();
        current = superuser.Current;
    });
    connect();
}

init();
