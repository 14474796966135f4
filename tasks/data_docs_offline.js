/* Great Expectations Data Docs without network: what the pages ask of jQuery, bootstrap-table and
   vega-embed (which they load from CDNs), done in plain DOM calls. The index's tables are built
   from their data, each row linking to its page; a chart is shown as the table of its data. */
(function () {
  "use strict";
  function cells(row, columns) {
    var link = row._table_row_link_path;
    return columns.map(function (column) {
      var value = row[column.field] === undefined ? "" : String(row[column.field]);
      var text = /</.test(value) || !link ? value : '<a href="' + link + '">' + value + "</a>";
      return "<td>" + text + "</td>";
    }).join("");
  }
  function table(node, options) {
    if (!options || typeof options !== "object") return;
    var columns = options.columns || [], rows = options.data || [];
    node.className += " table table-sm";
    node.innerHTML = "<thead><tr>" + columns.map(function (c) { return "<th>" + (c.title || c.field) + "</th>"; }).join("") +
      "</tr></thead><tbody>" + rows.map(function (r) { return "<tr>" + cells(r, columns) + "</tr>"; }).join("") + "</tbody>";
  }
  function wrap(nodes) {
    var self = {
      bootstrapTable: function (options) { nodes.forEach(function (n) { table(n, options); }); return self; },
      on: function () { return self; }, ready: function (fn) { whenReady(fn); return self; },
    };
    ["addClass", "removeClass", "toggleClass", "show", "hide", "tooltip", "popover", "tab"].forEach(function (name) {
      self[name] = function () { return self; };  // looks only: everything is shown, nothing toggles offline
    });
    return self;
  }
  function whenReady(fn) {
    if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", fn); else fn();
  }
  window.jQuery = window.$ = function (what) {
    if (typeof what === "function") { whenReady(what); return wrap([]); }
    if (typeof what === "string") { try { return wrap(Array.prototype.slice.call(document.querySelectorAll(what))); } catch (e) { return wrap([]); } }
    return wrap(what && what.nodeType === 1 ? [what] : []);
  };
  window.vegaEmbed = function (selector, spec) {
    var node = document.querySelector(selector), data = spec && spec.data || {};
    var values = data.values || (spec && spec.datasets && spec.datasets[data.name]) || [];
    if (node && values.length) {
      var keys = Object.keys(values[0]);
      node.innerHTML = '<table class="table table-sm offline-chart-data"><thead><tr>' +
        keys.map(function (k) { return "<th>" + k + "</th>"; }).join("") + "</tr></thead><tbody>" +
        values.map(function (v) { return "<tr>" + keys.map(function (k) { return "<td>" + v[k] + "</td>"; }).join("") + "</tr>"; }).join("") +
        "</tbody></table>";
    }
    return Promise.resolve({});
  };
})();
