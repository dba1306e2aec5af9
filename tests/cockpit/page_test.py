#!/usr/bin/python3
#! The Cockpit page in a real browser (issue 15): headless Chromium driven by
#! selenium and chromedriver (Debian's packages), against the real devmgrd
#! through a real cockpit-ws. Started by tests/tests/cockpit.rs, which makes
#! the bus, devmgrd and cockpit-ws and passes them in the environment:
#!   PAGE_URL             the page, as cockpit-ws serves it
#!   DEVCTL               the devctl binary; DEVMGR_BUS_ADDRESS its bus
#!   SCREENSHOTS          where to save screenshots (optional)
#!   DISK, MOUNT_POINT    the disk scenario's loop device and its mount
#! One scenario per run (argv[1]): admin, disk, readonly, refused, scale. It exits
#! non-zero with the reason on the first check that fails, and prints its
#! measurements as one JSON line starting with "TIMINGS ".

import json
import os
import signal
import subprocess
import sys
import tempfile
import time

from selenium import webdriver
from selenium.common.exceptions import TimeoutException, StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

URL = os.environ["PAGE_URL"]
DEVCTL = os.environ["DEVCTL"]
SHOTS = os.environ.get("SCREENSHOTS")
timings = {}


class Failed(Exception):
    pass


def check(condition, what):
    if not condition:
        raise Failed(what)


def devctl(*args, ok=True):
    """devctl against the test's devmgrd, as root (the test's administrator)."""
    out = subprocess.run([DEVCTL, *args], capture_output=True, text=True, timeout=120)
    if ok and out.returncode != 0:
        raise Failed(f"devctl {' '.join(args)} exited {out.returncode}: {out.stderr.strip()}")
    return out


def model():
    """Every object as devctl --json list gives it, by name."""
    return {o["name"]: o for o in json.loads(devctl("--json", "list").stdout)}


def hold(name, reason):
    """A reference held by a real client process (devctl hold … -- sleep)."""
    return subprocess.Popen([DEVCTL, "hold", name, "--reason", reason, "--", "sleep", "600"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def let_go(process):
    os.killpg(process.pid, signal.SIGTERM)
    process.wait(timeout=30)


def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1600,1000",
                f"--user-data-dir={tempfile.mkdtemp(prefix='devmgr-chromium-')}"]:
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


class Page:
    def __init__(self, driver):
        self.d = driver

    def wait(self, condition, what, timeout=30):
        def safe(_):
            try:
                return condition()
            except StaleElementReferenceException:
                return False
        try:
            return WebDriverWait(self.d, timeout, poll_frequency=0.05).until(safe)
        except TimeoutException:
            raise Failed(f"timed out ({timeout} s) waiting for {what}")

    def js(self, script, *args):
        return self.d.execute_script(script, *args)

    def open(self):
        started = time.monotonic()
        self.d.get(URL)
        self.wait(lambda: self.js("return document.body.dataset.rendered !== undefined"), "the page to render the model", 60)
        check(self.js("return document.body.dataset.state") == "ready", "the page is ready")
        # A marker that a reload would lose: updates must come without one.
        self.js("window.devmgrTestMarker = 'kept'")
        return time.monotonic() - started

    def not_reloaded(self):
        check(self.js("return window.devmgrTestMarker") == "kept", "the page was not reloaded")

    def row(self, name):
        rows = self.d.find_elements(By.CSS_SELECTOR, f'#tree tr[data-name="{name}"]')
        return rows[0] if rows else None

    def row_state(self, name):
        return self.js("const r = document.querySelector(`#tree tr[data-name='${arguments[0]}']`); return r ? r.dataset.state : null", name)

    def wait_row(self, name, state=None, timeout=30):
        return self.wait(lambda: self.row_state(name) is not None and (state is None or self.row_state(name) == state),
                         f"row {name}" + (f" in state {state}" if state else ""), timeout)

    def wait_no_row(self, name, timeout=30):
        self.wait(lambda: self.row_state(name) is None, f"row {name} to disappear", timeout)

    def select(self, name):
        self.wait_row(name)
        self.row(name).find_element(By.CSS_SELECTOR, ".devmgr-name").click()
        self.wait(lambda: self.text("#details-name") == name, f"the details of {name}")

    def text(self, selector):
        found = self.d.find_elements(By.CSS_SELECTOR, selector)
        return found[0].text if found else None

    def visible(self, selector):
        found = self.d.find_elements(By.CSS_SELECTOR, selector)
        return bool(found) and found[0].is_displayed()

    def click(self, selector):
        self.wait(lambda: self.visible(selector) and self.d.find_element(By.CSS_SELECTOR, selector).is_enabled(),
                  f"{selector} to be clickable")
        self.d.find_element(By.CSS_SELECTOR, selector).click()

    def shot(self, name):
        if SHOTS:
            os.makedirs(SHOTS, exist_ok=True)
            self.d.save_screenshot(os.path.join(SHOTS, f"{name}.png"))

    def open_remove(self, name):
        self.select(name)
        self.click("#action-remove")
        self.wait(lambda: self.visible("#remove-dialog"), "the remove dialog")
        self.wait(lambda: self.visible("#preview-outcome") or self.visible("#remove-dialog .pf-m-danger[data-alert]"),
                  "the dry run's answer")

    def rows(self):
        """How many objects the (virtual) tree lists: not all are drawn."""
        return int(self.js("return document.getElementById('tree').dataset.rows || '0'"))

    def errors(self):
        """Uncaught exceptions the page logged (never expected)."""
        return [e["message"] for e in self.d.get_log("browser")
                if e["level"] == "SEVERE" and "Uncaught" in e["message"]]


def in_the_shell(page):
    """The page is an entry of Cockpit's own menu (the manifest's "menu"),
    and loads in the shell's frame for it."""
    shell = URL.split("/cockpit/")[0] + "/devmgr"
    page.d.get(shell)
    page.wait(lambda: any(a.text == "Device manager" for a in page.d.find_elements(By.CSS_SELECTOR, "nav a")),
              "Device manager in Cockpit's menu")
    frame = page.wait(lambda: page.d.find_elements(By.CSS_SELECTOR, 'iframe[name="cockpit1:localhost/devmgr"]'),
                      "the page's frame in the shell")[0]
    page.d.switch_to.frame(frame)
    page.wait(lambda: page.js("return document.body.dataset.rendered !== undefined"), "the page in the shell", 60)
    page.d.switch_to.default_content()
    page.shot("shell")


def admin(page):
    """Root (devmgrd authorizes it): the tree, holders, pending removals,
    live updates, the dry run, force, stop, re-enable, add, errors."""
    devctl("add", "host", "host71", "--driver", "sim-scsi", "--luns", "3")
    in_the_shell(page)
    timings["open_s"] = page.open()
    page.wait_row("host71")
    check(page.text("#read-only") is None, "no read-only notice for root")
    # The machine's own devices and the simulated ones are told apart.
    sources = page.js("""return [...document.querySelectorAll('#tree tr[data-name]')].map(r =>
        [r.dataset.name, r.querySelector('.devmgr-source').textContent])""")
    by_name = dict(sources)
    check(by_name.get("host71") == "simulated" and by_name.get("71:0:0:1") == "simulated", f"simulated sources: {by_name.get('host71')}")
    machine = [n for n, s in sources if s == "machine"]
    check(machine, "the machine's own devices are listed as machine")
    timings["machine_objects"] = len(machine)
    # From here on, only what the test makes: the simulated objects.
    page.click('#show [data-show="simulated"]')
    page.wait(lambda: page.row("vda") is None and page.row(machine[0]) is None, "the machine's devices filtered out")

    # A held LUN: its row counts the holder as soon as it holds.
    holder = hold("71:0:0:1", "nightly backup of volume 7")
    page.wait(lambda: "nightly backup of volume 7" in (page.row("71:0:0:1").text or ""), "the holder in the LUN's row")
    page.select("71:0:0:1")
    page.wait(lambda: "nightly backup of volume 7" in (page.text("#holders") or ""), "the holders panel")
    holders_text = page.text("#holders")
    check("devctl" in holders_text and f"pid {holder.pid}" in holders_text, f"holder process and pid: {holders_text}")

    # Remove the host: the dry run says what goes now and who it waits on.
    page.open_remove("host71")
    check(page.js("return document.getElementById('preview-outcome').dataset.outcome") == "pending", "the dry run says pending")
    check("2 objects" in page.text("#preview-now"), f"goes now: {page.text('#preview-now')}")
    wait_text = page.text("#preview-wait")
    check("71:0:0:1" in wait_text and "nightly backup of volume 7" in wait_text, f"would wait on: {wait_text}")
    check(page.row_state("host71") == "live", "a dry run changes nothing")
    page.shot("remove-preview")
    page.click("#remove-confirm")
    page.wait(lambda: not page.visible("#remove-dialog"), "the dialog to close")
    page.wait_row("host71", "removing")
    page.wait_row("71:0:0:1", "removing")
    page.wait_no_row("71:0:0:0")
    page.wait(lambda: page.visible("#pending") and "nightly backup of volume 7" in page.text("#pending-list"), "the pending removals")
    pending = page.text("#pending-list")
    check("host71" in pending and "71:0:0:1" in pending, f"pending list: {pending}")
    page.select("71:0:0:1")
    page.wait(lambda: "nightly backup of volume 7" in (page.text("#waiting-for") or ""), "what the LUN waits for")
    page.shot("pending")
    check(model()["host71"]["state"] == "removing", "devmgrd has the host pending")

    # The holder lets go: the host goes from the page by itself.
    let_go(holder)
    page.wait_no_row("71:0:0:1")
    page.wait_no_row("host71")
    check(not page.visible("#pending"), "no pending removal left")
    page.not_reloaded()
    check("host71" not in model(), "devmgrd removed the host")

    # An idle host: the dry run says everything goes; confirm removes it.
    devctl("add", "host", "host72", "--driver", "sim-scsi", "--luns", "2")
    page.wait_row("72:0:0:1")
    page.open_remove("host72")
    check(page.js("return document.getElementById('preview-outcome').dataset.outcome") == "removed", "dry run: removed")
    check("3 objects" in page.text("#preview-outcome"), page.text("#preview-outcome"))
    page.click("#remove-confirm")
    page.wait_no_row("host72")
    page.wait_no_row("72:0:0:0")
    check("host72" not in model(), "devmgrd removed host72")

    # Force: a warning, then the holder's reference is revoked.
    devctl("add", "host", "host73", "--driver", "sim-scsi", "--luns", "1")
    forced = hold("73:0:0:0", "database files")
    page.wait(lambda: page.row("73:0:0:0") is not None and "database files" in page.row("73:0:0:0").text, "the held LUN")
    page.open_remove("host73")
    check(page.js("return document.getElementById('preview-outcome').dataset.outcome") == "pending", "without force: pending")
    check(not page.visible("#force-warning"), "no force warning before force is chosen")
    page.click("#remove-force")
    page.wait(lambda: page.visible("#force-warning"), "the force warning")
    check("revoked" in page.text("#force-warning"), page.text("#force-warning"))
    page.wait(lambda: page.js("const o = document.getElementById('preview-outcome'); return o && o.dataset.outcome") == "removed",
              "the dry run with force: removed")
    page.click("#remove-detach")
    page.wait(lambda: page.visible("#detach-warning"), "the detach-mounts warning")
    check("unmount" in page.text("#detach-warning"), page.text("#detach-warning"))
    page.shot("remove-force")
    page.click("#remove-detach")
    page.wait(lambda: not page.visible("#detach-warning"), "the detach-mounts warning to go")
    page.click("#remove-confirm")
    page.wait_no_row("host73")
    check("host73" not in model(), "devmgrd removed host73 at once")
    let_go(forced)
    told = forced.stderr.read()
    check("revoked" in told, f"the holder was told its reference was revoked: {told}")

    # Stop, re-enable, and cancelling a pending removal.
    devctl("add", "host", "host74", "--driver", "sim-scsi", "--luns", "1")
    page.select("host74")
    page.click("#action-stop")
    page.wait_row("host74", "stopped")
    page.click("#action-reenable")
    page.wait_row("host74", "live")
    kept = hold("74:0:0:0", "keep")
    page.wait(lambda: page.row("74:0:0:0") is not None and "keep" in page.row("74:0:0:0").text, "the held LUN")
    page.open_remove("host74")
    page.click("#remove-confirm")
    page.wait_row("host74", "removing")
    page.select("host74")
    page.click("#action-reenable")
    page.wait_row("host74", "live")
    page.wait_row("74:0:0:0", "live")
    check(model()["host74"]["state"] == "live", "the removal was cancelled in devmgrd")
    let_go(kept)

    # Add a simulated host from the page; a second with the same name is
    # refused by its D-Bus error name.
    for attempt in ("first", "second"):
        page.click("#add-host")
        page.wait(lambda: page.visible("#add-dialog"), "the add dialog")
        name_input = page.d.find_element(By.ID, "add-name")
        name_input.clear()
        name_input.send_keys("host75")
        luns = page.d.find_element(By.ID, "add-luns")
        luns.clear()
        luns.send_keys("2")
        page.click("#add-confirm")
        if attempt == "first":
            page.wait(lambda: not page.visible("#add-dialog"), "the add dialog to close")
            page.wait_row("75:0:0:1")
        else:
            page.wait(lambda: "org.devmgr.DevMgr1.Error.NameInUse" in (page.text("#add-dialog") or ""), "NameInUse in the dialog")
            check("Traceback" not in page.text("#add-dialog") and " at " not in page.text(".devmgr-modal-error"),
                  "no stack trace in the error")
            page.shot("error")
            page.click("#add-cancel")
    check(model()["host75"]["state"] == "live", "host75 was added")

    # Search.
    page.d.find_element(By.ID, "search").send_keys("75:0:0:1")
    page.wait(lambda: page.rows() == 2 and page.row("75:0:0:1") is not None, "search: the LUN and its host")
    page.d.find_element(By.ID, "search").clear()
    page.js("const s = document.getElementById('search'); s.value = ''; s.dispatchEvent(new Event('input'))")
    page.not_reloaded()
    page.shot("tree")


def disk(page):
    """A real disk (a loop device of the test's, ext4, mounted): the
    kernel's mount is its holder; removing it from the page waits for the
    mount, and the device goes, for real, once it is unmounted."""
    name, at = os.environ["DISK"], os.environ["MOUNT_POINT"]
    reason = f"mounted at {at} (ext4)"
    page.open()
    page.click('#show [data-show="machine"]')
    page.wait(lambda: page.row(name) is not None and reason in page.row(name).text, f"{name} held by its mount")
    page.select(name)
    page.wait(lambda: reason in (page.text("#holders") or "") and "kernel: mounted filesystem" in page.text("#holders"),
              "the mount in the holders panel")
    page.open_remove(name)
    check(page.js("return document.getElementById('preview-outcome').dataset.outcome") == "pending", "the dry run: pending")
    check(reason in page.text("#preview-wait"), f"would wait on the mount: {page.text('#preview-wait')}")
    page.click("#remove-confirm")
    page.wait_row(name, "removing")
    page.wait(lambda: reason in (page.text("#pending-list") or ""), "the pending removal waiting for the mount")
    page.select(name)
    page.wait(lambda: reason in (page.text("#waiting-for") or ""), "what the disk waits for")
    page.shot("disk-pending")
    check(os.path.ismount(at), "the filesystem is still mounted: a mounted disk is never torn away")
    subprocess.run(["umount", at], check=True)
    page.wait_no_row(name, 60)
    check(not os.path.exists(f"/sys/block/{name}"), f"the kernel removed {name}")
    page.not_reloaded()


def readonly(page):
    """A user devmgrd does not authorize (no polkit rule): everything is
    shown, nothing can be changed."""
    before = model()
    devctl("add", "host", "host81", "--driver", "sim-scsi", "--luns", "2")
    holder = hold("81:0:0:0", "read-only view")
    page.open()
    page.wait(lambda: page.visible("#read-only"), "the read-only notice")
    notice = page.text("#read-only")
    check("not authorize" in notice and "administrative access" in notice, f"read-only notice: {notice}")
    check(not page.d.find_element(By.ID, "add-host").is_enabled(), "Add is disabled")
    page.select("81:0:0:0")
    page.wait(lambda: "read-only view" in (page.text("#holders") or ""), "the holders, read-only")
    for action in ("#action-remove", "#action-stop"):
        button = page.d.find_element(By.CSS_SELECTOR, action)
        check(not button.is_enabled(), f"{action} is disabled")
        check("not authorize" in (button.get_attribute("title") or ""), f"{action} says why")
    page.shot("read-only")
    let_go(holder)
    page.wait(lambda: page.row("81:0:0:0") is not None and "read-only view" not in page.row("81:0:0:0").text, "the release, live")
    after = model()
    check(after["host81"]["state"] == "live", "nothing changed")
    check(set(after) == set(before) | {"host81", "81:0:0:0", "81:0:0:1"}, "no object came or went but the test's")


def refused(page):
    """A user polkit would ask to authenticate (a challenge): the actions
    are offered, and devmgrd's refusal is shown by its D-Bus name, readable,
    with nothing changed."""
    devctl("add", "host", "host91", "--driver", "sim-scsi", "--luns", "1")
    page.open()
    check(page.text("#read-only") is None, "no read-only notice when polkit could authorize")
    page.select("host91")
    page.click("#action-remove")
    page.wait(lambda: "org.devmgr.DevMgr1.Error.AccessDenied" in (page.text("#remove-dialog") or ""), "AccessDenied in the dialog")
    text = page.text("#remove-dialog")
    check("Not authorized" in text and "administrative access" in text and "org.devmgr.DevMgr1.remove" in text, text)
    page.shot("access-denied")
    page.click("#remove-cancel")
    page.click("#action-stop")
    page.wait(lambda: "org.devmgr.DevMgr1.Error.AccessDenied" in (page.text("#alerts") or ""), "AccessDenied for Stop")
    page.click("#add-host")
    page.d.find_element(By.ID, "add-name").send_keys("host92")
    page.click("#add-confirm")
    page.wait(lambda: "org.devmgr.DevMgr1.Error.AccessDenied" in (page.text("#add-dialog") or ""), "AccessDenied for Add")
    after = model()
    check(after["host91"]["state"] == "live" and "host92" not in after, "nothing changed")


def scale(page):
    """10,000 objects, then bursts of 1,000 changes while the page is open."""
    luns = int(os.environ.get("SCALE_LUNS", "9990"))
    devctl("add", "host", "host99", "--driver", "sim-scsi", "--luns", str(luns))
    total = len(model())
    timings["objects"] = total
    timings["open_to_rendered_s"] = round(page.open(), 3)
    check(page.rows() == total, f"{page.rows()} rows listed for {total} objects")
    t = page.js("return window.devmgrTimings")
    for key in ("script", "connected", "first", "listed", "rendered"):
        timings[f"page_{key}_ms"] = round(t[key])
    timings["rows_in_document"] = page.js("return document.querySelectorAll('#tree tr[data-name]').length")
    # The last LUN is there, at the bottom.
    page.js("const s = document.getElementById('tree-scroll'); s.scrollTop = s.scrollHeight")
    page.wait(lambda: page.row(f"99:0:0:{luns - 1}") is not None, "the last LUN after scrolling to the bottom")
    page.js("document.getElementById('tree-scroll').scrollTop = 0")
    page.shot("scale")
    # A heartbeat that measures the longest gap between two frames: a
    # frozen page shows as one long gap.
    page.js("""window.devmgrGaps = []; let last = performance.now();
        const beat = now => { window.devmgrGaps.push(now - last); last = now; requestAnimationFrame(beat); };
        requestAnimationFrame(beat);""")
    for what, command, expect in (
            ("add", ["add", "host", "host98", "--driver", "sim-scsi", "--luns", "1000"], total + 1001),
            ("remove", ["remove", "host98"], total)):
        page.js("window.devmgrGaps = []")
        started = time.monotonic()
        devctl(*command)
        page.wait(lambda: page.rows() == expect, f"the page to show the {what} burst", 120)
        timings[f"burst_{what}_s"] = round(time.monotonic() - started, 3)
        gaps = page.js("return window.devmgrGaps")
        timings[f"burst_{what}_longest_frame_ms"] = round(max(gaps), 1)
        timings[f"burst_{what}_frames"] = len(gaps)
    # The tree stays searchable at this size.
    started = time.monotonic()
    page.d.find_element(By.ID, "search").send_keys("99:0:0:9989")
    page.wait(lambda: page.rows() == 2 and page.row("99:0:0:9989") is not None, "the search at 10,000")
    timings["search_s"] = round(time.monotonic() - started, 3)
    page.not_reloaded()


SCENARIOS = {"admin": admin, "disk": disk, "readonly": readonly, "refused": refused, "scale": scale}


def main():
    scenario = SCENARIOS[sys.argv[1]]
    driver = browser()
    page = Page(driver)
    try:
        scenario(page)
        errors = page.errors()
        check(not errors, f"the page logged uncaught errors: {errors}")
    except Exception as failure:
        page.shot(f"failed-{sys.argv[1]}")
        print(f"FAILED: {type(failure).__name__}: {failure}", file=sys.stderr)
        for entry in driver.get_log("browser"):
            print(f"browser: {entry['level']} {entry['message']}", file=sys.stderr)
        sys.exit(1)
    finally:
        print("TIMINGS " + json.dumps(timings), flush=True)
        driver.quit()


if __name__ == "__main__":
    main()
