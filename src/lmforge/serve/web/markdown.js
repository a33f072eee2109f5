// A small, safe markdown renderer for model replies: every character is HTML-escaped before any markup is added,
// so a reply can never inject HTML or script. Handles fenced code (also an unclosed fence while streaming),
// headings, lists, quotes, rules, simple tables, inline code, bold, italics and http(s) links. No dependencies.
"use strict";

const Markdown = (() => {
  const escape = (s) => s.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;").replace(/"/g, "&quot;");

  function inline(text) {
    // Inline code first, kept aside so that emphasis rules never touch its contents.
    const codes = [];
    let s = text.replace(/`([^`\n]+)`/g, (_, c) => `\u0000${codes.push(c) - 1}\u0000`);
    s = escape(s)
      .replace(/\*\*([^*\n]+)\*\*/g, "<strong>$1</strong>")
      .replace(/(^|[^*\w])\*([^*\n]+)\*(?!\w)/g, "$1<em>$2</em>")
      .replace(/\[([^\]\n]+)\]\((https?:\/\/[^\s)]+)\)/g, '<a href="$2" target="_blank" rel="noopener noreferrer">$1</a>');
    return s.replace(/\u0000(\d+)\u0000/g, (_, i) => `<code>${escape(codes[+i])}</code>`);
  }

  function table(lines) {
    const cells = (l) => l.trim().replace(/^\||\|$/g, "").split("|").map((c) => inline(c.trim()));
    const head = cells(lines[0]).map((c) => `<th>${c}</th>`).join("");
    const body = lines.slice(2).map((l) => `<tr>${cells(l).map((c) => `<td>${c}</td>`).join("")}</tr>`).join("");
    return `<table><thead><tr>${head}</tr></thead><tbody>${body}</tbody></table>`;
  }

  function blocks(text) {
    const lines = text.split("\n");
    const out = [];
    let para = [];
    const flush = () => {
      if (para.length) out.push(`<p>${para.map(inline).join("<br>")}</p>`);
      para = [];
    };
    for (let i = 0; i < lines.length; i++) {
      const line = lines[i];
      let m;
      if (!line.trim()) { flush(); continue; }
      if ((m = line.match(/^(#{1,6})\s+(.*)$/))) { flush(); out.push(`<h${m[1].length}>${inline(m[2])}</h${m[1].length}>`); continue; }
      if (/^\s*([-*_])(\s*\1){2,}\s*$/.test(line)) { flush(); out.push("<hr>"); continue; }
      if (/^\s*\|.*\|\s*$/.test(line) && /^\s*\|?[\s:|-]+\|?\s*$/.test(lines[i + 1] || "")) {
        flush();
        const rows = [];
        while (i < lines.length && /^\s*\|.*\|\s*$/.test(lines[i])) rows.push(lines[i++]);
        i--;
        out.push(table(rows));
        continue;
      }
      if ((m = line.match(/^\s*([-*+]|\d+[.)])\s+/))) {
        flush();
        const ordered = /\d/.test(m[1]);
        const items = [];
        while (i < lines.length && (m = lines[i].match(/^\s*([-*+]|\d+[.)])\s+(.*)$/))) { items.push(inline(m[2])); i++; }
        i--;
        const tag = ordered ? "ol" : "ul";
        out.push(`<${tag}>${items.map((it) => `<li>${it}</li>`).join("")}</${tag}>`);
        continue;
      }
      if ((m = line.match(/^>\s?(.*)$/))) {
        flush();
        const quoted = [];
        while (i < lines.length && (m = lines[i].match(/^>\s?(.*)$/))) { quoted.push(m[1]); i++; }
        i--;
        out.push(`<blockquote>${blocks(quoted.join("\n"))}</blockquote>`);
        continue;
      }
      para.push(line);
    }
    flush();
    return out.join("");
  }

  function render(text) {
    const parts = [];
    const fence = /```([^\n`]*)\n([\s\S]*?)(?:```|$)/g;
    let last = 0;
    let m;
    while ((m = fence.exec(text))) {
      parts.push(blocks(text.slice(last, m.index)));
      const lang = escape(m[1].trim());
      parts.push(
        `<div class="code"><div class="code-head"><span>${lang || "code"}</span>` +
        `<button type="button" class="copy" data-copy>copy</button></div><pre><code>${escape(m[2])}</code></pre></div>`,
      );
      last = fence.lastIndex;
      if (m[0].length === 0) break;
    }
    parts.push(blocks(text.slice(last)));
    return parts.join("");
  }

  return { render, escape };
})();
