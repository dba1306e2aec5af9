//! The dialogs that change things: Remove (the dry run's answer first —
//! what goes now, what would wait and on whom — then a confirmation, with
//! force and detach-mounts each behind an explicit warning) and Add of a
//! simulated host. Errors stay in the dialog, named by their D-Bus name.

import { h, button, alert, errorBody } from "./dom.js";
import { describeError, waitingText, plural } from "./format.js";

let openModalBox = null;

/// A PatternFly modal box; returns handles to fill and close it.
export function openModal({ id, title, body, footer, onclose }) {
    if (openModalBox) openModalBox.close();
    const root = document.getElementById("modal-root");
    const errorSlot = h("div.devmgr-modal-error");
    const close = () => {
        document.removeEventListener("keydown", onKey);
        backdrop.remove();
        openModalBox = null;
        if (onclose) onclose();
    };
    const onKey = event => { if (event.key === "Escape") close(); };
    const box = h("div.pf-v5-c-modal-box.pf-m-md", { id, role: "dialog", "aria-modal": "true", "aria-labelledby": `${id}-title` },
        h("div.pf-v5-c-modal-box__close", null,
            h("button.pf-v5-c-button.pf-m-plain", { type: "button", "aria-label": "Close", onclick: close },
                h("i.fas.fa-times", { "aria-hidden": "true" }))),
        h("header.pf-v5-c-modal-box__header", null, h("h1.pf-v5-c-modal-box__title", { id: `${id}-title` }, title)),
        h("div.pf-v5-c-modal-box__body", null, errorSlot, body),
        h("footer.pf-v5-c-modal-box__footer", null, footer));
    const backdrop = h("div.pf-v5-c-backdrop", null, h("div.pf-v5-l-bullseye", null, box));
    root.append(backdrop);
    document.addEventListener("keydown", onKey);
    openModalBox = {
        box,
        close,
        error(err, verb) {
            const d = describeError(err, verb);
            errorSlot.replaceChildren(alert("danger", d.title, errorBody(d)));
        },
        clearError() { errorSlot.replaceChildren(); },
    };
    return openModalBox;
}

function checkbox(id, text, description, onchange) {
    const input = h("input.pf-v5-c-check__input", { type: "checkbox", id, onchange: () => onchange(input.checked) });
    return h("div.pf-v5-c-check", null, input,
        h("label.pf-v5-c-check__label", { for: id }, text),
        h("span.pf-v5-c-check__description", null, description));
}

function names(records, store, most = 8) {
    const shown = records.slice(0, most).map(r => store.displayName(r)).join(", ");
    return records.length > most ? `${shown}, and ${records.length - most} more` : shown;
}

/// Remove: dry run first, then confirm. ctx: { store, call, processOf, notify }
export function removeDialog(ctx, path) {
    const { store } = ctx;
    const record = store.get(path);
    if (!record) return;
    const name = store.displayName(record);
    const options = { force: false, detach: false };
    const preview = h("div", { id: "remove-preview" }, h("p.devmgr-muted", null, "Asking devmgrd what would happen…"));
    const forceWarning = alert("danger", "Force takes references away",
        h("p", null, "Every reference on what this removes is revoked now: the clients listed as holders lose their " +
            "handles at once and may fail. The kernel's users (mounts, swap, open device nodes) are not revoked: " +
            "the removal still waits for them."));
    const detachWarning = alert("danger", "Detach mounts unmounts filesystems",
        h("p", null, "Every filesystem mounted from these devices is lazily unmounted (as umount -l) in every mount " +
            "namespace, and their swap is turned off. Programs using those files may lose data. Processes are never killed."));
    forceWarning.id = "force-warning";
    detachWarning.id = "detach-warning";
    forceWarning.hidden = true;
    detachWarning.hidden = true;
    const confirm = button("Remove", "danger", () => run(), { id: "remove-confirm", disabled: true });
    const cancel = button("Cancel", "link", () => modal.close(), { id: "remove-cancel" });
    let asked = 0;

    const call = dryRun => {
        const arg = {};
        if (dryRun) arg["dry-run"] = cockpit.variant("b", true);
        if (options.force) arg.force = cockpit.variant("b", true);
        if (options.detach) arg["detach-mounts"] = cockpit.variant("b", true);
        return ctx.call(path, "org.devmgr.DevMgr1.Object", "Remove", [arg], "a{sv}");
    };
    const verb = () => (options.force || options.detach ? "remove-force" : "remove");

    const ask = () => {
        const mine = ++asked;
        confirm.disabled = true;
        modal.clearError();
        call(true).then(([outcome, pending]) => {
            if (mine !== asked) return;
            showPreview(outcome, pending);
            confirm.disabled = false;
        }).catch(err => {
            if (mine !== asked) return;
            preview.replaceChildren();
            modal.error(err, verb());
        });
    };

    const showPreview = (outcome, pendingPaths) => {
        const affected = record.kind === "driver" ? [record] : store.subtree(path);
        const pendingSet = new Set(pendingPaths);
        const now = affected.filter(r => !pendingSet.has(r.path));
        const waiting = pendingPaths.map(p => store.get(p)).filter(Boolean);
        const parts = [];
        if (outcome === "removed") {
            parts.push(h("p", { id: "preview-outcome", dataset: { outcome } },
                `Everything goes now: ${plural(affected.length, "object")} (${names(affected, store)}).`));
        } else {
            parts.push(h("p", { id: "preview-outcome", dataset: { outcome } },
                `${name} would not go at once: it is disabled now, with its removal pending, and goes by itself when its last user lets go.`));
            parts.push(h("p", { id: "preview-now" }, now.length
                ? `Goes now: ${plural(now.length, "object")} (${names(now, store)}).`
                : "Nothing goes now."));
            parts.push(h("p", null, `Would wait: ${plural(waiting.length, "object")}, on:`));
            // What each would wait for once the idle ones are gone.
            const after = r => {
                const waits = store.waitingFor(r.path);
                return { ...waits, below: waits.below.filter(x => pendingSet.has(x.path)) };
            };
            parts.push(h("ul.pf-v5-c-list.devmgr-preview-wait", { id: "preview-wait" }, waiting.map(r =>
                h("li", { dataset: { path: r.path } }, h("strong", null, store.displayName(r)), ` — ${waitingText(after(r), x => store.displayName(x), ctx.processOf)}`))));
        }
        if (record.kind === "driver") {
            const bound = store.waitingFor(path).bound;
            if (bound.length) parts.push(h("p", null, `Its ${plural(bound.length, "bound object")} are unbound (they stay, unbound).`));
        }
        preview.replaceChildren(...parts);
    };

    const run = () => {
        confirm.disabled = true;
        modal.clearError();
        call(false).then(([outcome, pending]) => {
            modal.close();
            ctx.notify(outcome === "removed" ? "success" : "info",
                outcome === "removed" ? `${name} was removed` : `${name}: removal pending`,
                outcome === "removed" ? "" : `${plural(pending.length, "object")} ${pending.length === 1 ? "waits" : "wait"} for ${pending.length === 1 ? "its" : "their"} users and ${pending.length === 1 ? "goes" : "go"} by ${pending.length === 1 ? "itself" : "themselves"} when idle; Cancel removal stops that.`);
        }).catch(err => {
            confirm.disabled = false;
            modal.error(err, verb());
        });
    };

    const modal = openModal({
        id: "remove-dialog",
        title: `Remove ${record.kind} ${name}?`,
        body: [
            preview,
            h("div.devmgr-options", null,
                checkbox("remove-force", "Force: revoke every reference now",
                    "The removal completes without waiting for the clients that hold references.", on => {
                        options.force = on;
                        forceWarning.hidden = !on;
                        ask();
                    }),
                forceWarning,
                checkbox("remove-detach", "Detach mounts: unmount filesystems and turn swap off",
                    "For real disks in use by the kernel (needs the same right as force).", on => {
                        options.detach = on;
                        detachWarning.hidden = !on;
                        ask();
                    }),
                detachWarning),
        ],
        footer: [confirm, cancel],
    });
    ask();
}

/// Add of a simulated host (the sim-scsi driver scans its LUNs).
export function addHostDialog(ctx) {
    const nameInput = h("input", { type: "text", id: "add-name", required: true, "aria-label": "Host name", value: "" });
    const lunsInput = h("input", { type: "number", id: "add-luns", min: "0", max: "1000000", value: "4", "aria-label": "LUNs" });
    const field = (labelText, input, help) => h("div.pf-v5-c-form__group", null,
        h("div.pf-v5-c-form__group-label", null, h("label.pf-v5-c-form__label", { for: input.id }, h("span.pf-v5-c-form__label-text", null, labelText))),
        h("div.pf-v5-c-form__group-control", null, h("span.pf-v5-c-form-control", null, input),
            help ? h("div.pf-v5-c-helper-text", null, h("div.pf-v5-c-helper-text__item", null, h("span.pf-v5-c-helper-text__item-text", null, help))) : null));
    const add = button("Add", "primary", () => run(), { id: "add-confirm" });
    const form = h("form.pf-v5-c-form", { onsubmit: event => { event.preventDefault(); run(); } },
        field("Name", nameInput, "A name no other host of the API uses."),
        field("LUNs", lunsInput, "The sim-scsi driver scans this many devices below it."));
    const run = () => {
        const hostName = nameInput.value.trim();
        const luns = Number(lunsInput.value);
        if (!hostName) {
            modal.error({ name: "org.devmgr.DevMgr1.Error.InvalidArgument", message: "The host needs a name." });
            return;
        }
        if (!Number.isInteger(luns) || luns < 0 || luns > 0xffffffff) {
            modal.error({ name: "org.devmgr.DevMgr1.Error.InvalidArgument", message: "LUNs must be a whole number, 0 or more." });
            return;
        }
        add.disabled = true;
        modal.clearError();
        ctx.call("/org/devmgr/DevMgr1", "org.devmgr.DevMgr1.Manager", "FindObject", ["driver", "sim-scsi"], "ss")
            .then(([driver]) => ctx.call("/org/devmgr/DevMgr1", "org.devmgr.DevMgr1.Manager", "Add",
                ["host", hostName, "/", { driver: cockpit.variant("o", driver), luns: cockpit.variant("u", luns) }], "ssoa{sv}"))
            .then(([path]) => {
                modal.close();
                ctx.notify("success", `Added ${hostName}`, `with ${plural(luns, "LUN")}`);
                ctx.select(path);
            })
            .catch(err => {
                add.disabled = false;
                modal.error(err, "add");
            });
    };
    const modal = openModal({
        id: "add-dialog",
        title: "Add a simulated host",
        body: form,
        footer: [add, button("Cancel", "link", () => modal.close(), { id: "add-cancel" })],
    });
    nameInput.focus();
}
