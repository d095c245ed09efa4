// The gateway's access token, when it has one: the page is opened as /?token=TOKEN, and every
// call it makes carries the token on (a bearer header for fetch; the query for the event
// stream, which cannot set headers, and for links to the other page and the trace).
"use strict";
const ACCESS_TOKEN = new URLSearchParams(location.search).get("token") || "";

function withToken(url) {
  if (!ACCESS_TOKEN) return url;
  const u = new URL(url, location.href);
  u.searchParams.set("token", ACCESS_TOKEN);
  return u.pathname + u.search;
}

function apiFetch(url, options = {}) {
  const headers = new Headers(options.headers || {});
  if (ACCESS_TOKEN) headers.set("Authorization", `Bearer ${ACCESS_TOKEN}`);
  return fetch(url, {...options, headers});
}

for (const a of document.querySelectorAll("a[href^='/']")) a.href = withToken(a.getAttribute("href"));
