package org.smartfhirproxy.hapi;

import jakarta.servlet.Filter;
import jakarta.servlet.FilterChain;
import jakarta.servlet.ServletException;
import jakarta.servlet.ServletRequest;
import jakarta.servlet.ServletResponse;
import jakarta.servlet.http.HttpServletRequest;
import jakarta.servlet.http.HttpServletResponse;

import java.io.FileOutputStream;
import java.io.IOException;
import java.io.OutputStream;
import java.nio.charset.StandardCharsets;

/**
 * Appends one line per request to a file, flushed per line:
 * {@code 127.0.0.1 - "METHOD RAWPATH?RAWQUERY HTTP/1.1" STATUS}. Path and query are as received
 * (not decoded); "?" is left out when there is no query string. The smart-fhir-proxy test
 * harness parses this format.
 */
public final class AccessLogFilter implements Filter {
	private final OutputStream myOut;

	public AccessLogFilter(String theFile) throws IOException {
		myOut = new FileOutputStream(theFile, true);
	}

	@Override
	public void doFilter(ServletRequest theRequest, ServletResponse theResponse, FilterChain theChain)
			throws IOException, ServletException {
		HttpServletRequest req = (HttpServletRequest) theRequest;
		HttpServletResponse resp = (HttpServletResponse) theResponse;
		int status = 500;
		try {
			theChain.doFilter(theRequest, theResponse);
			status = resp.getStatus();
		} finally {
			String query = req.getQueryString();
			String line = remote(req) + " - \"" + req.getMethod() + " " + req.getRequestURI()
					+ (query == null ? "" : "?" + query) + " " + protocol(req) + "\" " + status + "\n";
			byte[] bytes = line.getBytes(StandardCharsets.UTF_8);
			synchronized (myOut) {
				myOut.write(bytes);
				myOut.flush();
			}
		}
	}

	private static String remote(HttpServletRequest theRequest) {
		String addr = theRequest.getRemoteAddr();
		return addr == null || addr.isEmpty() ? "-" : addr;
	}

	private static String protocol(HttpServletRequest theRequest) {
		String p = theRequest.getProtocol();
		// HTTP/2 or odd clients: the harness expects HTTP/1.x; keep what came in if it is 1.x
		return p != null && p.startsWith("HTTP/1.") ? p : "HTTP/1.1";
	}

	@Override
	public void destroy() {
		try {
			myOut.close();
		} catch (IOException e) {
			// ignore
		}
	}
}
