// The referral slip's print button (the page's scripts must be files: Content-Security-Policy).
(function () {
  "use strict";
  var button = document.getElementById("print");
  if (button) { button.addEventListener("click", function () { window.print(); }); }
}());
