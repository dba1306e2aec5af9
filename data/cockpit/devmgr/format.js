//! Words and numbers as the page shows them: states, sources, holders,
//! ages, and errors by their D-Bus name with what to do about them. Pure
//! (no DOM), so that node can test it.

export const ERROR_PREFIX = "org.devmgr.DevMgr1.Error.";

/// A state's label text and PatternFly colour.
export function stateLabel(state) {
    switch (state) {
    case "live": return { text: "live", color: "green" };
    case "stopped": return { text: "stopped", color: "grey" };
    case "removing": return { text: "removal pending", color: "orange" };
    case "gone": return { text: "gone", color: "red" };
    default: return { text: state || "unknown", color: "grey" };
    }
}

/// Where an object comes from: the machine (udev) or the API (simulated
/// or added by a client).
export function sourceLabel(record) {
    return record.origin === "udev"
        ? { text: "machine", color: "blue", title: `a real device of this machine${record.subsystem ? ` (${record.subsystem})` : ""}` }
        : { text: "simulated", color: "purple", title: "added through devmgrd's API (simulated or a client's own object)" };
}

/// "12 s", "3 min", "2 h 5 min", "4 d" since `sinceMicros` (µs since the
/// epoch, devmgrd's clock).
export function age(sinceMicros, nowMillis) {
    const seconds = Math.max(0, Math.floor((nowMillis - sinceMicros / 1000) / 1000));
    if (seconds < 60) return `${seconds} s`;
    const minutes = Math.floor(seconds / 60);
    if (minutes < 60) return `${minutes} min`;
    const hours = Math.floor(minutes / 60);
    if (hours < 48) return minutes % 60 ? `${hours} h ${minutes % 60} min` : `${hours} h`;
    return `${Math.floor(hours / 24)} d`;
}

/// What kind of holder this is: a client over D-Bus or one of the
/// kernel's users (rule 17).
export function holderKind(holder) {
    if (holder.holder.startsWith("kernel:")) {
        const what = holder.holder.slice("kernel:".length);
        const names = { mount: "mounted filesystem", swap: "swap", holder: "stacked device", process: "open device node" };
        return { kernel: true, text: `kernel: ${names[what] || what}` };
    }
    return { kernel: false, text: `D-Bus client ${holder.holder}` };
}

/// One line naming a holder, for lists ("sleep (pid 42): nightly backup").
export function holderLine(holder, processName) {
    const kind = holderKind(holder);
    const who = holder.pid > 0
        ? `${processName || "pid " + holder.pid}${processName ? ` (pid ${holder.pid})` : ""}`
        : kind.text;
    return holder.reason ? `${who}: ${holder.reason}` : who;
}

export function plural(n, one, many) {
    return `${n.toLocaleString("en")} ${n === 1 ? one : many || one + "s"}`;
}

/// What a pending removal still waits for, in one sentence.
export function waitingText(waiting, nameOf, processOf) {
    const parts = [];
    if (waiting.refCount > 0) {
        const shown = waiting.holders.slice(0, 3).map(h => holderLine(h, processOf(h.pid)));
        const more = waiting.refCount - shown.length;
        parts.push(`${plural(waiting.refCount, "holder")} (${shown.join("; ")}${more > 0 ? `; and ${more} more` : ""})`);
    }
    if (waiting.below.length > 0) {
        const names = waiting.below.slice(0, 3).map(nameOf);
        const more = waiting.below.length - names.length;
        parts.push(`${plural(waiting.below.length, "object")} below it (${names.join(", ")}${more > 0 ? `, and ${more} more` : ""})`);
    }
    if (waiting.bound.length > 0) {
        parts.push(`${plural(waiting.bound.length, "bound object")}`);
    }
    return parts.length ? `waiting for ${parts.join(", and ")}` : "completing";
}

/// An error as the page shows it: its D-Bus name, devmgrd's message, and
/// what the reader can do. Never a stack trace.
export function describeError(error, verb) {
    const name = (error && error.name) || "";
    const message = (error && (error.message || error.problem)) || String(error || "unknown error");
    const short = name.startsWith(ERROR_PREFIX) ? name.slice(ERROR_PREFIX.length) : name;
    const action = verb ? `org.devmgr.DevMgr1.${verb}` : "org.devmgr.DevMgr1.*";
    const hints = {
        AccessDenied: "You are not authorized to change devmgrd's objects. Turn on administrative access " +
            "(Cockpit's \u201cLimited access\u201d button), or ask an administrator to grant you the polkit " +
            `action ${action} (a rule in /etc/polkit-1/rules.d, see docs/install.md) or membership of devmgrd's authorized group.`,
        InvalidState: "The object's state does not allow this now; it may have changed meanwhile.",
        NotFound: "The object no longer exists: it went meanwhile.",
        NameInUse: "Another object already has this name: choose another.",
        InvalidArgument: "devmgrd refused a value given to it; nothing changed.",
        NotSupported: "devmgrd cannot do this itself; the message says what would.",
        QuotaExceeded: "A limit was reached; nothing changed. Let go of something, or ask an administrator.",
        "org.freedesktop.DBus.Error.ServiceUnknown": "devmgrd is not running, and the system bus could not start it.",
        "org.freedesktop.DBus.Error.NoReply": "devmgrd did not answer in time.",
        "org.freedesktop.DBus.Error.LimitsExceeded": "The answer would be too big for the bus.",
    };
    const problems = {
        "not-found": "devmgrd is not on the system bus.",
        disconnected: "The connection to the machine was lost.",
        "access-denied": "Cockpit refused the request.",
        timeout: "The request timed out.",
    };
    const title = name ? (short === "AccessDenied" ? "Not authorized" : short) : (error && error.problem) || "Error";
    const hint = hints[short] || hints[name] || problems[error && error.problem] || "";
    return { title, name: name || (error && error.problem) || "", message, hint };
}
