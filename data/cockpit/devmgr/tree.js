//! The device tree as a PatternFly tree table: drivers, hosts and devices
//! with their kind, state, source and holders (the rest is in the details
//! panel); collapsible, searchable and
//! filtered. The table is virtual: the list of visible objects is an array
//! (rebuilt only when objects come, go or move, or the filter changes), and
//! only the rows in the scrolled window are in the document, between two
//! spacers. So 10,000 objects, or a burst of 1,000 changes, cost the
//! browser a few dozen rows of layout, never 10,000.

import { h, label } from "./dom.js";
import { stateLabel, sourceLabel, holderLine } from "./format.js";

/// Deepest level PatternFly's tree table indents (aria-level 1–10).
const MAX_LEVEL = 10;
/// Rows drawn above and below the window, so a short scroll shows rows
/// already made.
const OVERSCAN = 30;

export class TreeView {
    constructor(store, tbody, scroller, { onSelect, processOf }) {
        this.store = store;
        this.tbody = tbody;
        this.scroller = scroller;
        this.onSelect = onSelect;
        this.processOf = processOf;
        this.rows = new Map(); // path → <tr>, for the rows of the window
        this.collapsed = new Set();
        this.query = "";
        this.show = "all";
        this.selected = null;
        this.structure = -1; // the store's structure `list` was built for
        this.stale = true; // the filter or expansion changed
        this.list = []; // [record, level] of every visible object, in order
        this.rowHeight = 0; // measured from the first row drawn
        this.window = [0, 0]; // the list's slice now in the document
        this.top = h("tr.devmgr-spacer", { "aria-hidden": "true" }, h("td", { colspan: "5" }));
        this.bottom = h("tr.devmgr-spacer", { "aria-hidden": "true" }, h("td", { colspan: "5" }));
    }

    get visibleCount() {
        return this.list.length;
    }

    setQuery(query) {
        this.query = query.trim().toLowerCase();
        this.stale = true;
    }

    setShow(show) {
        this.show = show;
        this.stale = true;
    }

    toggle(path) {
        if (this.collapsed.has(path)) this.collapsed.delete(path);
        else this.collapsed.add(path);
        this.stale = true;
    }

    expandAll() {
        this.collapsed.clear();
        this.stale = true;
    }

    collapseAll() {
        for (const record of this.store.objects.values()) {
            if (this.store.childrenOf(record.path).length) this.collapsed.add(record.path);
        }
        this.stale = true;
    }

    select(path) {
        const old = this.selected && this.rows.get(this.selected);
        if (old) old.classList.remove("pf-m-selected");
        this.selected = path;
        // Show it: open its ancestors, and scroll to it once drawn.
        for (const ancestor of this.store.ancestors(path)) {
            if (this.collapsed.delete(ancestor.path)) this.stale = true;
        }
        this.reveal = path;
        const row = this.rows.get(path);
        if (row) row.classList.add("pf-m-selected");
    }

    /// Whether `record` passes the search and the source/state filter.
    matches(record) {
        switch (this.show) {
        case "machine": if (record.origin !== "udev") return false; break;
        case "simulated": if (record.origin !== "api") return false; break;
        case "held": if (record.refCount === 0) return false; break;
        case "pending": if (record.state !== "removing") return false; break;
        }
        if (!this.query) return true;
        const q = this.query;
        if (record.name.toLowerCase().includes(q)) return true;
        return record.holders.some(hd => hd.reason.toLowerCase().includes(q) || hd.holder.toLowerCase().includes(q));
    }

    /// The rows to show, with their levels: every object under expanded
    /// parents; with a search or filter, the matches and their ancestors.
    visible() {
        const out = [];
        const store = this.store;
        if (!this.query && this.show === "all") {
            const stack = store.childrenOf("/").map(r => [r, 1]).reverse();
            while (stack.length) {
                const [record, level] = stack.pop();
                out.push([record, level]);
                if (!this.collapsed.has(record.path)) {
                    const below = store.childrenOf(record.path);
                    for (let i = below.length - 1; i >= 0; i--) stack.push([below[i], level + 1]);
                }
            }
            return out;
        }
        const keep = new Set();
        for (const record of store.objects.values()) {
            if (!this.matches(record)) continue;
            keep.add(record.path);
            for (const ancestor of store.ancestors(record.path)) keep.add(ancestor.path);
        }
        const stack = store.childrenOf("/").filter(r => keep.has(r.path)).map(r => [r, 1]).reverse();
        while (stack.length) {
            const [record, level] = stack.pop();
            out.push([record, level]);
            const below = store.childrenOf(record.path).filter(r => keep.has(r.path));
            for (let i = below.length - 1; i >= 0; i--) stack.push([below[i], level + 1]);
        }
        return out;
    }

    /// Brings the table up to date: the list again when objects came, went
    /// or moved or the filter changed; then the rows of the scrolled window,
    /// of which only those whose object changed are written again.
    render(changed) {
        if (this.stale || this.structure !== this.store.structure) {
            this.structure = this.store.structure;
            this.stale = false;
            this.list = this.visible();
            this.tbody.dataset.rows = String(this.list.length);
            this.window = [0, 0];
        }
        if (this.reveal) {
            const at = this.list.findIndex(([record]) => record.path === this.reveal);
            this.reveal = null;
            if (at >= 0 && this.rowHeight) {
                const y = at * this.rowHeight;
                const view = this.scroller.clientHeight;
                if (y < this.scroller.scrollTop || y + this.rowHeight > this.scroller.scrollTop + view) {
                    this.scroller.scrollTop = Math.max(0, y - view / 3);
                }
            }
        }
        this.draw(changed);
    }

    /// Puts the rows of the scrolled window in the document (when the
    /// window moved or the list changed), else rewrites the changed rows.
    draw(changed) {
        const height = this.rowHeight || 36;
        const first = Math.max(0, Math.floor(this.scroller.scrollTop / height) - OVERSCAN);
        const count = Math.ceil((this.scroller.clientHeight || 800) / height) + 2 * OVERSCAN;
        const last = Math.min(this.list.length, first + count);
        if (this.window[0] === first && this.window[1] === last && this.tbody.firstChild === this.top) {
            for (const path of changed) {
                const row = this.rows.get(path);
                const record = this.store.get(path);
                if (row && record) this.fill(row, record, Number(row.dataset.level));
            }
            return;
        }
        this.window = [first, last];
        const rows = new Map();
        const fragment = document.createDocumentFragment();
        fragment.append(this.top);
        for (let i = first; i < last; i++) {
            const [record, level] = this.list[i];
            const row = this.rows.get(record.path) || this.createRow(record.path);
            rows.set(record.path, row);
            this.fill(row, record, level);
            fragment.append(row);
        }
        fragment.append(this.bottom);
        this.rows = rows;
        this.tbody.replaceChildren(fragment);
        if (!this.rowHeight && last > first) {
            this.rowHeight = this.top.nextSibling.getBoundingClientRect().height || 36;
        }
        this.top.firstChild.style.height = `${first * (this.rowHeight || height)}px`;
        this.bottom.firstChild.style.height = `${(this.list.length - last) * (this.rowHeight || height)}px`;
        this.top.hidden = first === 0;
        this.bottom.hidden = last === this.list.length;
    }

    createRow(path) {
        const toggle = h("button.pf-v5-c-button.pf-m-plain", { type: "button", "aria-label": "Expand or collapse" },
            h("div.pf-v5-c-table__toggle-icon", null, h("i.fas.fa-angle-down", { "aria-hidden": "true" })));
        toggle.addEventListener("click", event => {
            event.stopPropagation();
            this.toggle(path);
            this.onSelect(null);
        });
        const name = h("button.pf-v5-c-button.pf-m-link.pf-m-inline.devmgr-name", { type: "button" });
        const row = h("tr.pf-v5-c-table__tr.pf-m-clickable", { dataset: { path } },
            h("th.pf-v5-c-table__th.pf-v5-c-table__tree-view-title-cell", { "data-label": "Name" },
                h("div.pf-v5-c-table__tree-view-main", null,
                    h("span.pf-v5-c-table__toggle", null, toggle),
                    h("div.pf-v5-c-table__tree-view-text", null, h("span.pf-v5-c-table__text", null, name)))),
            h("td.pf-v5-c-table__td.devmgr-kind", { "data-label": "Kind" }),
            h("td.pf-v5-c-table__td.devmgr-state", { "data-label": "State" }),
            h("td.pf-v5-c-table__td.devmgr-source", { "data-label": "Source" }),
            h("td.pf-v5-c-table__td.devmgr-holders", { "data-label": "Holders" }));
        row.addEventListener("click", () => this.onSelect(path));
        return row;
    }

    /// Writes `record` into its row, unless the row already shows this
    /// revision at this level.
    fill(row, record, level) {
        const hasChildren = this.store.childrenOf(record.path).length > 0;
        const expanded = hasChildren && (this.query || this.show !== "all" || !this.collapsed.has(record.path));
        const newest = record.holders[record.holders.length - 1];
        const summary = newest ? holderLine(newest, this.processOf(newest.pid)) : "";
        const key = `${record.rev}/${level}/${hasChildren}/${expanded}/${this.selected === record.path}/${summary}`;
        if (row.devmgrKey === key) return;
        row.devmgrKey = key;
        row.setAttribute("aria-level", Math.min(level, MAX_LEVEL));
        row.dataset.level = String(level);
        row.dataset.name = this.store.displayName(record);
        row.dataset.state = record.state;
        row.dataset.kind = record.kind;
        row.classList.toggle("pf-m-selected", this.selected === record.path);
        row.classList.toggle("devmgr-row-removing", record.state === "removing");
        row.classList.toggle("devmgr-row-gone", record.state === "gone");
        row.classList.toggle("devmgr-row-stopped", record.state === "stopped");
        row.classList.toggle("pf-m-expanded", expanded);
        if (hasChildren) row.setAttribute("aria-expanded", String(expanded));
        else row.removeAttribute("aria-expanded");
        const [title, kindCell, stateCell, sourceCell, holdersCell] = row.children;
        const toggle = title.querySelector(".pf-v5-c-table__toggle");
        toggle.hidden = !hasChildren;
        toggle.firstChild.classList.toggle("pf-m-expanded", expanded);
        title.querySelector(".devmgr-name").textContent = row.dataset.name;
        kindCell.textContent = record.kind;
        const state = stateLabel(record.state);
        stateCell.replaceChildren(label(state.text, state.color));
        if (record.lastError) stateCell.append(" ", label("failed", "red", record.lastError));
        const source = sourceLabel(record);
        sourceCell.replaceChildren(label(source.text, source.color, source.title));
        if (record.refCount > 0) {
            holdersCell.replaceChildren(h("span.devmgr-refcount", null, String(record.refCount)),
                summary ? h("span.devmgr-holder-summary", { title: summary }, summary) : "");
        } else {
            holdersCell.textContent = "";
        }
    }
}
