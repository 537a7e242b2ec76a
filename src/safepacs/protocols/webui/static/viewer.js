// The built-in viewer: one rendered image at a time from WADO-RS (/rendered), scrolling through the
// series, window/level by dragging.  The images come from DICOMweb with the page's session.
"use strict";
(() => {
  const box = document.getElementById("viewer");
  const img = document.getElementById("frame");
  const status = document.getElementById("viewer-status");
  if (!box || !img) return;
  const frames = JSON.parse(box.dataset.frames || "[]");
  let index = Math.floor(frames.length / 2);
  let center = null;
  let width = null;
  let start = null;

  const url = () => {
    let u = frames[index];
    if (center !== null && width !== null) {
      u += "?window=" + Math.round(center) + "," + Math.max(1, Math.round(width)) + ",linear";
    }
    return u;
  };
  const show = () => {
    if (!frames.length) { status.textContent = "This series has no images."; return; }
    img.src = url();
    img.alt = "Image " + (index + 1) + " of " + frames.length;
    status.textContent = "Image " + (index + 1) + " of " + frames.length +
      (center !== null ? " · window " + Math.round(center) + "/" + Math.round(width) : "");
  };
  const move = (step) => {
    index = Math.min(frames.length - 1, Math.max(0, index + step));
    show();
  };
  const metadata = async () => {  // the first image's window, to start dragging from
    const meta = frames[index].replace(/\/rendered$/, "/metadata");
    try {
      const answer = await fetch(meta, { headers: { Accept: "application/dicom+json" } });
      const body = await answer.json();
      const first = (tag) => (body[0][tag] && body[0][tag].Value ? Number(body[0][tag].Value[0]) : null);
      center = first("00281050");
      width = first("00281051");
      if (center === null || width === null) { center = 2048; width = 4096; }
    } catch (error) {
      center = 2048; width = 4096;
    }
  };
  box.addEventListener("wheel", (event) => { event.preventDefault(); move(event.deltaY > 0 ? 1 : -1); }, { passive: false });
  box.addEventListener("keydown", (event) => {
    if (event.key === "ArrowDown" || event.key === "ArrowRight" || event.key === "PageDown") { move(1); event.preventDefault(); }
    if (event.key === "ArrowUp" || event.key === "ArrowLeft" || event.key === "PageUp") { move(-1); event.preventDefault(); }
    if (event.key === "r" || event.key === "R") { center = null; width = null; show(); }
  });
  box.addEventListener("pointerdown", async (event) => {
    if (center === null) await metadata();
    start = { x: event.clientX, y: event.clientY, center, width };
    box.setPointerCapture(event.pointerId);
  });
  box.addEventListener("pointermove", (event) => {
    if (!start) return;
    width = Math.max(1, start.width + (event.clientX - start.x) * 4);
    center = start.center + (event.clientY - start.y) * 2;
  });
  box.addEventListener("pointerup", () => { if (start) { start = null; show(); } });
  show();
})();
