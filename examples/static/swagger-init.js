// Start Swagger UI on the document sanic-ext serves (URLs from this script tag's data-*).
const tag = document.currentScript;
window.addEventListener("load", () => {
  window.ui = SwaggerUIBundle({
    url: tag.dataset.url,
    configUrl: tag.dataset.configUrl,
    dom_id: "#openapi",
    deepLinking: true,
    presets: [SwaggerUIBundle.presets.apis, SwaggerUIStandalonePreset],
    plugins: [SwaggerUIBundle.plugins.DownloadUrl],
    layout: "StandaloneLayout",
  });
});
