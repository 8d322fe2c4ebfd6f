"""Small fixes to the HTML that Jupyter Book 1 writes, loaded from _config.yml
(`sphinx.local_extensions`). Found by the browser test (tests/browser).

1. One copy of each inline script. Sphinx 7.4 (Jupyter Book 1 needs Sphinx 7) writes an
   inline ``<script>`` twice when an extension adds it after the builder has started:
   once as it is added and once more when writing begins, because one copy is recorded
   with the file name ``None`` and the other with ``''``. sphinx-thebe's
   ``const THEBE_JS_URL = ...`` declared twice then throws a SyntaxError on every page.
   Fixed upstream after Sphinx 7 (sphinx-doc/sphinx#13402); here each page's script list
   loses its duplicates just before the page is written.

2. Widgets served from the book. The widget embed script (embed-amd.js, an AMD bundle
   loaded through RequireJS) finds its icon fonts relative to where RequireJS thinks it
   lives, which is the page's own folder unless RequireJS is told otherwise: the fonts
   404. And it typesets widget labels with MathJax 2's ``MathJax.Hub.Queue``, which
   MathJax 3 does not have: an uncaught TypeError per widget. On a page with widgets, a
   small inline script before RequireJS configures the path and bridges that one call to
   MathJax 3's ``typesetPromise``.

3. The scripts the book serves itself. `make assets` (part of `make book`) stages MathJax
   and the widget scripts in the folder that `html_static_path` names; a build without
   them would write pages that show raw TeX. Fail early, and say what to run.
"""

from __future__ import annotations

from pathlib import Path

from sphinx.application import Sphinx
from sphinx.errors import ConfigError


def _drop_duplicate_scripts(app: Sphinx, pagename, templatename, context, doctree) -> None:
    scripts = context.get("script_files")
    if not isinstance(scripts, list):
        return
    seen = set()
    kept = []
    for js in scripts:
        filename = getattr(js, "filename", js) or ""
        attributes = tuple(sorted(getattr(js, "attributes", {}).items()))
        key = (filename, getattr(js, "priority", None), attributes)
        if key not in seen:
            seen.add(key)
            kept.append(js)
    scripts[:] = kept  # the builder restores its own list after each page


# Runs before RequireJS (a global `require` object is RequireJS's documented way to be
# configured before it loads) and, for MathJax, once the deferred MathJax 3 has loaded.
WIDGET_SUPPORT_JS = """\
var require = {paths: {"@jupyter-widgets/html-manager/dist": "%(manager_dir)s"}};
document.addEventListener("DOMContentLoaded", function () {
  var mj = window.MathJax;
  if (!mj || mj.Hub || typeof mj.typesetPromise !== "function") return;
  mj.Hub = {Queue: function () {
    Array.prototype.forEach.call(arguments, function (job) {
      if (Array.isArray(job) && job[0] === "Typeset" && job[2]) {
        mj.startup.promise.then(function () { return mj.typesetPromise([job[2]]); });
      }
    });
  }};
});"""


def _add_widget_support(app: Sphinx, pagename, templatename, context, doctree) -> None:
    scripts = context.get("script_files")
    if not isinstance(scripts, list):
        return
    embed = [str(js.filename) for js in scripts
             if getattr(js, "filename", None) and str(js.filename).split("?")[0].endswith("embed-amd.js")]
    if not embed or "://" in embed[0]:
        return
    manager_dir = context["pathto"](embed[0].rsplit("/", 1)[0], 1)
    app.add_js_file(None, body=WIDGET_SUPPORT_JS % {"manager_dir": manager_dir}, priority=499)


def _check_local_assets(app: Sphinx) -> None:
    if app.builder is None or app.builder.format != "html":
        return
    mathjax = app.config.mathjax_path
    if not mathjax or "://" in mathjax:
        return
    static_dirs = [Path(app.confdir, p) for p in app.config.html_static_path]
    if not any((d / mathjax).is_file() for d in static_dirs):
        raise ConfigError(
            f"mathjax_path {mathjax!r} is in none of the html_static_path folders: run "
            "`make assets` (or `make book`, which runs it) to install MathJax and the widget "
            "scripts with npm")


def setup(app: Sphinx) -> dict:
    # After every other handler, including myst-nb's, which adds a page's widget scripts.
    app.connect("html-page-context", _add_widget_support, priority=890)
    app.connect("html-page-context", _drop_duplicate_scripts, priority=900)
    app.connect("builder-inited", _check_local_assets)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
