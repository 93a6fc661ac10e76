import { defineConfig } from 'vite';

// `npm run dev` proxies the API to a quetzald started with
// `--listen 127.0.0.1:8080` (or QUETZAL_URL).
export default defineConfig({
  esbuild: { jsx: 'automatic', jsxImportSource: 'preact' },
  build: {
    // noVNC uses top-level await.
    target: 'es2022',
    outDir: 'dist',
    emptyOutDir: true,
    chunkSizeWarningLimit: 1024,
  },
  server: {
    proxy: {
      '/api': { target: process.env.QUETZAL_URL || 'http://127.0.0.1:8080', ws: true },
    },
  },
});
