// The live board of the status page: polls the JSON API and redraws what changed.
// Strings come from the page (server-side i18n); every value from the API is escaped.
(function () {
  "use strict";
  var T = JSON.parse(document.getElementById("i18n").textContent);
  var C = JSON.parse(document.getElementById("config").textContent);
  var LOCALE = C.lang === "vi" ? "vi-VN" : "en-GB";
  var POLL_MS = 1000;
  var STATUS_MS = 2000;
  var shown = {};

  function $(id) { return document.getElementById(id); }
  function esc(v) {
    return String(v === null || v === undefined ? "" : v).replace(/[&<>"']/g, function (c) {
      return { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c];
    });
  }
  function t(key) { return T[key] || key; }
  function time(ts) { return ts ? new Date(ts * 1000).toLocaleTimeString(LOCALE) : ""; }
  function dateTime(ts) {
    if (!ts) { return ""; }
    var d = new Date(ts * 1000);
    var today = new Date().toDateString() === d.toDateString();
    return today ? d.toLocaleTimeString(LOCALE) : d.toLocaleString(LOCALE);
  }
  function duration(s) {
    if (s === null || s === undefined) { return "–"; }
    if (s < 60) { return Math.round(s) + " s"; }
    if (s < 3600) { return Math.round(s / 60) + " min"; }
    return (s / 3600).toFixed(1) + " h";
  }
  function bytes(n) { return n === undefined ? "–" : (n / 1073741824).toFixed(1) + " GB"; }
  function score(x) { return x === null || x === undefined ? "–" : Number(x).toFixed(2); }

  var RESULT_KEYS = { refer: "refer", no_signs: "no_signs", no_tb_result: "no_tb_result",
    skipped: "skipped", failed: "failed", analyzing: "analyzing", received: "received" };
  function reasonText(v) {
    if (v.state === "skipped" && v.reason_category && v.reason_category !== "other") {
      return t("reason_" + v.reason_category);
    }
    return v.reason || "";
  }
  function busy(v) { return v.result === "analyzing" || v.result === "received"; }
  // TB keeps its own words; a refer raised by other findings names them ("REFER: Mass").
  function flagText(v) {
    if (v.result === "refer" && !v.tb_positive && (v.refer_reasons || []).length) {
      return t("refer_for").replace("{reasons}", v.refer_reasons.join(", "));
    }
    return t(RESULT_KEYS[v.result] || v.result);
  }
  function size(o) {
    if (o.kind !== "detection") { return ""; }
    if (o.diameter_mm) { return Number(o.diameter_mm).toFixed(1) + " mm"; }
    return o.diameter_px ? Math.round(o.diameter_px) + " px" : "";
  }
  function findingClass(o) { return o.refer ? "finding-refer" : (o.positive ? "finding-positive" : "finding-negative"); }
  // Positive other findings with score and size, then the negative ones in one muted line.
  function othersText(v) {
    var list = v.other_findings || [];
    var pos = list.filter(function (o) { return o.positive; }).map(function (o) {
      var s = size(o);
      return '<span class="' + findingClass(o) + '">' + esc(o.display) + " " + score(o.score) +
        (s ? " · " + esc(s) : "") + (o.refer ? " · " + esc(t("refers")) : "") + "</span>";
    });
    var neg = list.filter(function (o) { return !o.positive; }).map(function (o) {
      return esc(o.display) + " " + score(o.score);
    });
    if (!pos.length) { pos.push('<span class="finding-negative">' + esc(t("none_found")) + "</span>"); }
    if (neg.length) {
      pos.push('<small class="finding-negative">' + esc(t("negative")) + ": " + neg.join(", ") + "</small>");
    }
    return pos.join("");
  }
  function deliveryText(v) {
    var parts = Object.keys(v.delivery_by_destination).map(function (d) {
      var s = v.delivery_by_destination[d];
      return '<span class="delivery-' + esc(s) + '">' + esc(d) + ": " + esc(t("delivery_" + s)) + "</span>";
    });
    return parts.length ? parts.join(" · ") : '<span class="delivery-none">' + esc(t("delivery_none")) + "</span>";
  }

  function card(v) {
    var flag = (busy(v) ? '<span class="spinner"></span>' : "") + esc(flagText(v));
    var reason = reasonText(v);
    var facts = [
      '<div class="patient" id="latest-patient">' + esc(v.patient_name) + "</div>",
      '<div class="meta">' + esc(t("patient_id")) + ": " + esc(v.patient_id) + " · " + esc(time(v.received_at)) + "</div>",
    ];
    if (reason) { facts.push('<div class="reason">' + esc(reason) + "</div>"); }
    if (v.tb_positive && (v.refer_reasons || []).length > 1) {
      facts.push('<div class="reason" id="latest-refer-also">' +
        esc(t("refer_also").replace("{reasons}", v.refer_reasons.slice(1).join(", "))) + "</div>");
    }
    if (v.tb_score !== null) {
      facts.push('<div class="fact"><span>' + esc(t("tb_score")) + "</span><b>" + score(v.tb_score) +
        "</b> <small>(" + esc(t("threshold")) + " " + score(v.tb_threshold) + ")</small></div>");
    }
    if (v.nodule_count !== null) {
      facts.push('<div class="fact"><span>' + esc(t("nodules")) + "</span><b>" + esc(v.nodule_count) + "</b></div>");
    }
    if ((v.other_findings || []).length) {
      facts.push('<div class="fact" id="latest-others"><span>' + esc(t("other_findings")) +
        '</span><div class="others">' + othersText(v) + "</div></div>");
    }
    if (v.forwarding && v.forwarding !== "none") {
      facts.push('<div class="fact"><span>' + esc(t("image_to_pacs")) + '</span><span class="delivery-' +
        esc(v.forwarding) + '">' + esc(t("delivery_" + v.forwarding)) + "</span></div>");
    }
    facts.push('<div class="fact"><span>' + esc(t("results_to_pacs")) + "</span>" + deliveryText(v) + "</div>");
    if (v.demonstration) { facts.push('<div class="demo">' + esc(t("demo_warning")) + "</div>"); }
    facts.push('<a class="button" href="' + esc(v.detail_url) + '">' + esc(t("details")) + "</a>");
    return '<article class="card result-' + esc(v.result) + '" data-uid="' + esc(v.sop_instance_uid) + '">' +
      '<div class="flag" id="latest-flag">' + flag + "</div>" +
      '<div class="card-body"><a href="' + esc(v.detail_url) + '"><img class="thumb" alt="" src="' +
      esc(v.thumbnail_url) + '"></a><div class="facts">' + facts.join("") + "</div></div></article>";
  }

  function row(v) {
    var timings = Object.keys(v.timings_ms || {}).sort().map(function (k) {
      return esc(k) + " " + Math.round(v.timings_ms[k]);
    }).join(" · ");
    var state = esc(t("state_" + v.state));
    var reason = reasonText(v);
    if (reason) { state += ": " + esc(reason); }
    var result = v.state === "analyzed" ? '<span class="pill result-' + esc(v.result) + '">' +
      esc(flagText(v)) + "</span> " : "";
    var others = (v.other_findings || []).filter(function (o) { return o.positive; }).map(function (o) {
      return '<span class="' + findingClass(o) + '">' + esc(o.display) + "</span>";
    }).join(", ");
    return '<tr class="state-' + esc(v.state) + '"><td>' + esc(dateTime(v.received_at)) + "</td>" +
      '<td><a href="' + esc(v.detail_url) + '">' + esc(v.patient_name || "?") + "</a><br><small>" +
      esc(v.patient_id) + "</small></td><td>" + result + state + "</td><td>" + score(v.tb_score) +
      "</td><td>" + (v.nodule_count === null ? "–" : esc(v.nodule_count)) + "</td><td>" + (others || "–") +
      "</td><td>" + deliveryText(v) +
      "</td><td><small>" + timings + "</small></td></tr>";
  }

  function health(h) {
    var items = [];
    function item(label, value, bad) {
      items.push('<div class="hitem' + (bad ? " bad" : "") + '"><span>' + esc(label) + "</span><b>" + value + "</b></div>");
    }
    item(t("listener"), esc(h.listener_up ? t("up") : t("down")), !h.listener_up);
    (h.destinations || []).forEach(function (d) {
      var s = d.reachable === null ? t("checking") : (d.reachable ? t("reachable") : t("unreachable"));
      item(d.name + " (" + d.ae_title + ")", esc(s), d.reachable === false);
    });
    var q = h.queues || {};
    item(t("analysis_queue"), esc(q.analysis === undefined ? "–" : q.analysis), false);
    Object.keys(q.delivery || {}).forEach(function (d) {
      item(t("delivery_queue") + " → " + d, esc(q.delivery[d]), false);
    });
    item(t("oldest_unsent"), esc(duration(h.oldest_pending_delivery_s)), (h.oldest_pending_delivery_s || 0) > 600);
    if (q.gave_up) { item(t("gave_up_count"), esc(q.gave_up), true); }
    var sc = q.commitments || {};
    if (sc.waiting) { item(t("commitments_waiting"), esc(sc.waiting), false); }
    if (sc.gave_up) { item(t("commitments_gave_up"), esc(sc.gave_up), true); }
    var disk = h.disk || {};
    item(t("disk_free"), esc(bytes(disk.free_bytes)) + (disk.low ? " " + esc(t("disk_low")) : ""), disk.low);
    (h.models || []).forEach(function (m) {
      item(t("models"), esc(m.name + " " + m.version + " · " + m.backend), false);
    });
    if (h.triton) {   // [models] backend = "triton": the shared inference server
      var tr = h.triton;
      item("Triton " + tr.url, esc((tr.reachable ? t("reachable") : t("unreachable")) +
        (tr.round_trip_ms !== null && tr.round_trip_ms !== undefined ? " · " + Math.round(tr.round_trip_ms) + " ms" : "")),
        !tr.reachable);
      (tr.models || []).forEach(function (m) {
        item("Triton · " + m.name, esc((m.ready ? t("up") : t("down")) + (m.backend ? " · " + m.backend : "")), !m.ready);
      });
    }
    var p = h.platform || {};
    (p.temperatures || []).forEach(function (s) {
      item(t("temperature") + " " + s.name, esc(s.celsius.toFixed(0) + " °C"), s.celsius > 85);
    });
    if (p.gpu_utilization_percent !== null && p.gpu_utilization_percent !== undefined) {
      item(t("gpu_load"), esc(Math.round(p.gpu_utilization_percent) + " %"), false);
    }
    (h.problems || []).forEach(function (p) {
      if (p.indexOf("worker_dead") === 0) { item(t("workers"), esc(t("down")), true); }
      if (p === "analysis_stalled") { item(t("analysis_queue"), esc(t("stalled")), true); }
    });
    var head = '<h2 class="' + (h.ok ? "ok" : "bad") + '">' + esc(t("system")) + ": " +
      esc(h.ok ? t("all_ok") : t("problems")) + "</h2>";
    var notes = (h.notices || []).map(function (n) { return '<p class="banner banner-warning notice">' + esc(n) + "</p>"; });
    return head + notes.join("") + '<div class="hgrid">' + items.join("") + "</div>";
  }

  function put(el, key, html) {
    if (shown[key] !== html) {   // unchanged HTML is left alone: no flicker, no image reload
      el.innerHTML = html;
      shown[key] = html;
      Array.prototype.forEach.call(el.querySelectorAll("img"), function (img) {
        img.addEventListener("error", function () { img.classList.add("missing"); });
      });
    }
  }

  function get(url) {
    return fetch(url, { credentials: "same-origin", cache: "no-store" }).then(function (r) {
      if (r.status === 401) {
        window.location.href = C.login + "?next=" + encodeURIComponent(window.location.pathname);
        throw new Error("login required");
      }
      if (!r.ok) { throw new Error("HTTP " + r.status); }
      return r.json();
    });
  }

  function loop(url, every, draw) {
    function tick() {
      get(url).then(function (data) {
        draw(data);
        $("connection").hidden = true;
      }).catch(function () {
        $("connection").hidden = false;
      }).then(function () { window.setTimeout(tick, every); });
    }
    tick();
  }

  loop(C.instances, POLL_MS, function (data) {
    var list = data.instances || [];
    put($("latest"), "latest", list.length ? card(list[0]) :
      '<div class="card result-none"><div class="flag">' + esc(t("no_images")) + "</div></div>");
    put(document.querySelector("#recent tbody"), "rows", list.map(row).join(""));
  });
  loop(C.status, STATUS_MS, function (h) { put($("health"), "health", health(h)); });
}());
