//! Building PatternFly markup from script without innerHTML: every text
//! from devmgrd (names, reasons, errors) goes in as text, never as markup,
//! and no inline style or handler is needed (Cockpit's CSP refuses them).

/// An element: h("div.pf-v5-c-card.extra", {id: "x", onclick: f}, child, "text", …).
export function h(tag, attrs, ...children) {
    const [name, ...classes] = tag.split(".");
    const element = document.createElement(name || "div");
    if (classes.length) element.className = classes.join(" ");
    for (const [key, value] of Object.entries(attrs || {})) {
        if (value === undefined || value === null || value === false) continue;
        if (key.startsWith("on") && typeof value === "function") element.addEventListener(key.slice(2), value);
        else if (key === "dataset") Object.assign(element.dataset, value);
        else if (key === "text") element.textContent = value;
        else if (key === "class") element.className += (element.className ? " " : "") + value;
        else element.setAttribute(key, value === true ? "" : value);
    }
    append(element, children);
    return element;
}

function append(element, children) {
    for (const child of children) {
        if (child === null || child === undefined || child === false) continue;
        if (Array.isArray(child)) append(element, child);
        else element.append(child instanceof Node ? child : String(child));
    }
}

/// A PatternFly label ("live", "machine"…).
export function label(text, color, title) {
    return h(`span.pf-v5-c-label.pf-m-compact.pf-m-${color}`, { title },
        h("span.pf-v5-c-label__content", null, h("span.pf-v5-c-label__text", null, text)));
}

/// A PatternFly button.
export function button(text, variant, onclick, attrs) {
    return h(`button.pf-v5-c-button.pf-m-${variant}`, { type: "button", onclick, ...attrs }, text);
}

/// A PatternFly inline alert; `variant` is danger, warning, info or success.
export function alert(variant, title, body, onclose) {
    const icons = { danger: "fa-exclamation-circle", warning: "fa-exclamation-triangle", info: "fa-info-circle", success: "fa-check-circle" };
    const box = h(`div.pf-v5-c-alert.pf-m-inline.pf-m-${variant}`, { role: variant === "danger" ? "alert" : "status", "data-alert": variant },
        h("div.pf-v5-c-alert__icon", null, h(`i.fas.fa-fw.${icons[variant]}`, { "aria-hidden": "true" })),
        h("p.pf-v5-c-alert__title", null, title));
    if (onclose) {
        box.append(h("div.pf-v5-c-alert__action", null,
            h("button.pf-v5-c-button.pf-m-plain", { type: "button", "aria-label": "Close", onclick: onclose },
                h("i.fas.fa-times", { "aria-hidden": "true" }))));
    }
    if (body) box.append(h("div.pf-v5-c-alert__description", null, body));
    return box;
}

/// A description list of [term, value] pairs.
export function descriptions(pairs) {
    return h("dl.pf-v5-c-description-list.pf-m-horizontal.pf-m-compact", null,
        pairs.filter(Boolean).map(([term, value]) => h("div.pf-v5-c-description-list__group", null,
            h("dt.pf-v5-c-description-list__term", null, h("span.pf-v5-c-description-list__text", null, term)),
            h("dd.pf-v5-c-description-list__description", null, h("div.pf-v5-c-description-list__text", null, value)))));
}

/// An error described by format.js's describeError: its D-Bus name,
/// devmgrd's message, and what to do, as the body of an alert.
export function errorBody(d) {
    return h("div", null,
        h("p.devmgr-error-name", null, d.name),
        h("p", null, d.message),
        d.hint ? h("p", null, d.hint) : null);
}
