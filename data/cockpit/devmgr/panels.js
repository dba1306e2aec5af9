//! The panels beside the tree: the selected object's details with every
//! holder (bus name or kernel user, process, pid and uid, reason, age) and
//! its actions, and the list of pending removals, each with what it still
//! waits for.

import { h, label, button, alert, descriptions } from "./dom.js";
import { stateLabel, sourceLabel, holderKind, age, waitingText, plural } from "./format.js";

/// Most pending removals listed at once (the Pending filter shows all).
const PENDING_SHOWN = 50;

/// What the details panel needs from the page.
/// ctx: { store, processOf(pid), can(verb) → {ok, why}, select(path), loadAll(path), act: {remove, stop, reenable} }

function actionButton(text, variant, verb, ctx, onclick, id) {
    const permission = ctx.can(verb);
    return button(text, variant, permission.ok ? onclick : null, {
        id,
        disabled: !permission.ok,
        "aria-disabled": permission.ok ? null : "true",
        title: permission.ok ? null : permission.why,
    });
}

function actions(record, ctx) {
    const row = [];
    if (record.state === "live" || record.state === "stopped") {
        row.push(actionButton("Remove…", "danger", "remove", ctx, () => ctx.act.remove(record.path), "action-remove"));
    }
    if (record.state === "removing") {
        row.push(actionButton("Cancel removal", "primary", "reenable", ctx, () => ctx.act.reenable(record.path), "action-reenable"));
        row.push(actionButton("Remove…", "secondary", "remove", ctx, () => ctx.act.remove(record.path), "action-remove"));
    }
    if (record.state === "live" || record.state === "removing") {
        row.push(actionButton("Stop", "secondary", "stop", ctx, () => ctx.act.stop(record.path), "action-stop"));
    }
    if (record.state === "stopped") {
        row.push(actionButton("Re-enable", "primary", "reenable", ctx, () => ctx.act.reenable(record.path), "action-reenable"));
    }
    return row.length ? h("div.devmgr-actions", null, row) : null;
}

function link(record, ctx) {
    if (!record) return "—";
    return h("button.pf-v5-c-button.pf-m-link.pf-m-inline", { type: "button", onclick: () => ctx.select(record.path) },
        ctx.store.displayName(record));
}

function holdersTable(record, ctx, now) {
    if (record.refCount === 0) return h("p.devmgr-muted", { id: "holders-empty" }, "Nobody holds it.");
    const rows = [...record.holders].reverse().map(holder => {
        const kind = holderKind(holder);
        const process = holder.pid > 0
            ? `${ctx.processOf(holder.pid) || "?"} (pid ${holder.pid}, uid ${holder.uid})`
            : holder.uid ? `uid ${holder.uid}` : "—";
        const since = new Date(holder.since / 1000);
        return h("tr.pf-v5-c-table__tr", { dataset: { holder: holder.holder } },
            h("td.pf-v5-c-table__td", { "data-label": "Holder" }, kind.kernel ? label(kind.text, "cyan") : kind.text),
            h("td.pf-v5-c-table__td", { "data-label": "Process" }, process),
            h("td.pf-v5-c-table__td.devmgr-reason", { "data-label": "Reason" }, holder.reason || "—"),
            h("td.pf-v5-c-table__td", { "data-label": "Held for", title: `since ${since.toLocaleString()}` }, age(holder.since, now)));
    });
    const missing = record.refCount - record.holders.length;
    return h("div", null,
        h("table.pf-v5-c-table.pf-m-compact.devmgr-holders-table", { id: "holders", "aria-label": "Holders" },
            h("thead.pf-v5-c-table__thead", null, h("tr.pf-v5-c-table__tr", null,
                ["Holder", "Process", "Reason", "Held for"].map(t => h("th.pf-v5-c-table__th", { scope: "col" }, t)))),
            h("tbody.pf-v5-c-table__tbody", null, rows)),
        missing > 0 ? h("p.devmgr-muted", null, `and ${plural(missing, "older holder")} not listed (devmgrd bounds Holders to fit the bus)`) : null);
}

/// Fills the details panel for `path` (or an empty prompt).
export function renderDetails(container, path, ctx) {
    const store = ctx.store;
    const record = path && store.get(path);
    if (!record) {
        container.replaceChildren(h("div.pf-v5-c-card__body.devmgr-muted", null,
            path ? "This object is gone." : "Select an object to see who holds it."));
        return;
    }
    const now = Date.now();
    const state = stateLabel(record.state);
    const source = sourceLabel(record);
    const parent = record.parent !== "/" ? store.get(record.parent) : null;
    const driver = record.driver !== "/" ? store.get(record.driver) : null;
    const below = store.childrenOf(record.path);
    const notes = [];
    if (record.state === "removing") {
        const waiting = store.waitingFor(record.path);
        notes.push(alert("warning", "Removal pending", h("p", { id: "waiting-for" },
            `It refuses new users and goes by itself when idle: ${waitingText(waiting, r => store.displayName(r), ctx.processOf)}.`)));
    }
    if (record.state === "gone") {
        notes.push(alert("danger", "Gone", h("p", null, "The kernel removed the real device while it was still held; it goes when its holders let go.")));
    }
    if (record.lastError) {
        notes.push(alert("danger", "The last driver action failed", h("p", null, record.lastError)));
    }
    if (record.attributes === null) ctx.loadAll(record.path);
    const attributes = Object.entries(record.attributes || {}).sort(([a], [b]) => a.localeCompare(b));
    container.replaceChildren(
        h("div.pf-v5-c-card__header", null, h("div.pf-v5-c-card__title", null,
            h("h2.pf-v5-c-title.pf-m-lg", { id: "details-name" }, store.displayName(record)), " ",
            label(state.text, state.color), " ", label(source.text, source.color, source.title))),
        h("div.pf-v5-c-card__body", null,
            actions(record, ctx),
            notes,
            h("h3.pf-v5-c-title.pf-m-md.devmgr-subtitle", null, `Holders (${record.refCount.toLocaleString("en")})`),
            holdersTable(record, ctx, now),
            h("h3.pf-v5-c-title.pf-m-md.devmgr-subtitle", null, "Properties"),
            descriptions([
                ["Kind", record.kind],
                ["Source", `${source.text}: ${source.title}`],
                ["Parent", link(parent, ctx)],
                ["Driver", link(driver, ctx)],
                record.subsystem && ["Subsystem", record.subsystem],
                record.sysPath && ["Sys path", h("code", null, record.sysPath)],
                ["Below it", below.length ? plural(below.length, "object") : "nothing"],
                ["Object path", h("code", null, record.path)],
            ]),
            attributes.length ? h("details.devmgr-attributes", null,
                h("summary", null, `Attributes (${attributes.length})`),
                descriptions(attributes.map(([k, v]) => [k, v]))) : null));
}

/// Fills the pending removals card: every removing object with what it
/// still waits for; hidden when there is none.
export function renderPending(card, list, title, ctx) {
    const store = ctx.store;
    const pending = store.pending();
    card.hidden = pending.length === 0;
    title.textContent = `Pending removals (${pending.length.toLocaleString("en")})`;
    const items = pending.slice(0, PENDING_SHOWN).map(record => {
        const waiting = store.waitingFor(record.path);
        return h("li.devmgr-pending-item", { dataset: { path: record.path, name: store.displayName(record) } },
            h("button.pf-v5-c-button.pf-m-link.pf-m-inline", { type: "button", onclick: () => ctx.select(record.path) },
                store.displayName(record)),
            ` (${record.kind}) `,
            h("span.devmgr-waiting", null, waitingText(waiting, r => store.displayName(r), ctx.processOf)));
    });
    if (pending.length > PENDING_SHOWN) {
        items.push(h("li.devmgr-muted", null, `and ${(pending.length - PENDING_SHOWN).toLocaleString("en")} more: choose “Pending” above the tree to see them all`));
    }
    list.replaceChildren(...items);
}
