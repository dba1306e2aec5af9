//! Builds the Cockpit page's styles: PatternFly's base and the components
//! the page uses, from the pinned @patternfly/patternfly (package-lock.json),
//! into devmgr/vendor/patternfly.css, with the fonts and icons it names.
//! The page's own files are served as they are (no bundler); run by
//! `cargo xtask cockpit` (and so by `cargo xtask install`) after `npm ci`.
//! Same inputs, same bytes out: no dates, no absolute paths.

import { createHash } from "node:crypto";
import { copyFileSync, existsSync, mkdirSync, readFileSync, renameSync, rmSync, writeFileSync } from "node:fs";
import { dirname, join, normalize } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const pf = join(here, "node_modules/@patternfly/patternfly");
const out = join(here, "devmgr/vendor");

// The components the page's markup uses (class names pf-v5-c-<name>).
const PARTS = [
    "components/Alert/alert.css",
    "components/Backdrop/backdrop.css",
    "components/Button/button.css",
    "components/Card/card.css",
    "components/Check/check.css",
    "components/DescriptionList/description-list.css",
    "components/EmptyState/empty-state.css",
    "components/Form/form.css",
    "components/FormControl/form-control.css",
    "components/HelperText/helper-text.css",
    "components/Label/label.css",
    "components/List/list.css",
    "components/ModalBox/modal-box.css",
    "components/Page/page.css",
    "components/Spinner/spinner.css",
    "components/Table/table.css",
    "components/Table/table-tree-view.css",
    "components/TextInputGroup/text-input-group.css",
    "components/Title/title.css",
    "components/Toolbar/toolbar.css",
    "components/ToggleGroup/toggle-group.css",
    "layouts/Bullseye/bullseye.css",
    "layouts/Flex/flex.css",
];

function fail(why) {
    console.error(`build.mjs: ${why}`);
    process.exit(1);
}

if (!existsSync(join(pf, "package.json"))) {
    fail(`${pf} is missing: run \`npm ci\` in data/cockpit first (cargo xtask cockpit does)`);
}
const version = JSON.parse(readFileSync(join(pf, "package.json"), "utf8")).version;
const pinned = JSON.parse(readFileSync(join(here, "package.json"), "utf8")).devDependencies["@patternfly/patternfly"];
if (version !== pinned) {
    fail(`node_modules has @patternfly/patternfly ${version}, package.json pins ${pinned}: run \`npm ci\``);
}

const parts = [`/* PatternFly ${version} (MIT): base and the components devmgr's page uses. Built by data/cockpit/build.mjs; do not edit. */\n`];
const assets = new Set();
for (const file of ["patternfly-base.css", ...PARTS]) {
    const path = join(pf, file);
    if (!existsSync(path)) fail(`${file} is not in @patternfly/patternfly ${version}`);
    let css = readFileSync(path, "utf8");
    // Every url() the base names is relative to the package's root; the
    // components name none. Keep the same relative paths under vendor/.
    css = css.replace(/url\(["']?([^"')]+)["']?\)/g, (whole, url) => {
        if (url.startsWith("data:")) return whole;
        const relative = normalize(join(dirname(file), url));
        if (relative.startsWith("..")) fail(`${file} names ${url}, outside the package`);
        assets.add(relative);
        return `url("./${relative}")`;
    });
    parts.push(`/* ${file} */\n${css}\n`);
}

// Build beside the output, then swap: several `cargo xtask` may build at
// once (the install tests do), and a reader must never see a half-made
// vendor/. When the result is what is there already, nothing is touched.
const css = parts.join("");
const digest = createHash("sha256").update(css).digest("hex").slice(0, 16);
const wanted = [...assets].sort();
const same = existsSync(join(out, "patternfly.css")) &&
    readFileSync(join(out, "patternfly.css"), "utf8") === css &&
    wanted.every(asset => existsSync(join(out, asset)) &&
        readFileSync(join(out, asset)).equals(readFileSync(join(pf, asset))));
if (same) {
    console.log(`devmgr/vendor: up to date (PatternFly ${version}, sha256 ${digest}…, ${wanted.length} assets)`);
    process.exit(0);
}
const fresh = `${out}.new-${process.pid}`;
rmSync(fresh, { recursive: true, force: true });
mkdirSync(fresh, { recursive: true });
writeFileSync(join(fresh, "patternfly.css"), css);
for (const asset of wanted) {
    const from = join(pf, asset);
    if (!existsSync(from)) fail(`${asset}, named by the styles, is not in the package`);
    mkdirSync(dirname(join(fresh, asset)), { recursive: true });
    copyFileSync(from, join(fresh, asset));
}
const old = `${out}.old-${process.pid}`;
if (existsSync(out)) renameSync(out, old);
renameSync(fresh, out);
rmSync(old, { recursive: true, force: true });
console.log(`devmgr/vendor: patternfly.css (${version}, sha256 ${digest}…) and ${wanted.length} assets`);
