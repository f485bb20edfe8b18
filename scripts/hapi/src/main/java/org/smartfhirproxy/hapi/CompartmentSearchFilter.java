package org.smartfhirproxy.hapi;

import ca.uhn.fhir.context.FhirContext;
import ca.uhn.fhir.context.RuntimeResourceDefinition;
import ca.uhn.fhir.context.RuntimeSearchParam;
import ca.uhn.fhir.jpa.api.dao.DaoRegistry;
import ca.uhn.fhir.jpa.api.dao.IFhirResourceDao;
import ca.uhn.fhir.jpa.searchparam.SearchParameterMap;
import ca.uhn.fhir.rest.api.server.SystemRequestDetails;
import ca.uhn.fhir.rest.param.ReferenceParam;
import jakarta.servlet.Filter;
import jakarta.servlet.FilterChain;
import jakarta.servlet.ServletException;
import jakarta.servlet.ServletRequest;
import jakarta.servlet.ServletResponse;
import jakarta.servlet.http.HttpServletRequest;
import jakarta.servlet.http.HttpServletRequestWrapper;
import org.hl7.fhir.instance.model.api.IIdType;

import java.io.IOException;
import java.net.URLEncoder;
import java.nio.charset.StandardCharsets;
import java.util.Collections;
import java.util.Enumeration;
import java.util.LinkedHashMap;
import java.util.LinkedHashSet;
import java.util.List;
import java.util.Map;
import java.util.Set;
import java.util.regex.Matcher;
import java.util.regex.Pattern;

/**
 * Compartment search ({@code GET [base]/Patient/p1/Observation?...}, also {@code POST
 * [base]/Patient/p1/Observation/_search}), which HAPI's JPA server does not implement.
 *
 * <p>The members are found with one search per compartment parameter of the target type (from
 * the R4 CompartmentDefinitions built into HAPI, e.g. Observation in Patient: subject, performer),
 * e.g. {@code Observation?subject=Patient/p1}; the request is then handed to HAPI as
 * {@code [base]/Observation?<original query>&_id=<member ids>}, so every other parameter, paging,
 * {@code _include}, {@code _total} etc. behave as in a type search. A compartment's own resource
 * ({@code Patient/p1/Patient}) is a member of it. Links in the answer show the rewritten search.
 */
public final class CompartmentSearchFilter implements Filter {
	/** A well-formed id that no test data uses: the search when the compartment has no member. */
	private static final String NO_MEMBER = "no-compartment-member-0";

	private static final Pattern PATH =
			Pattern.compile("^/fhir/([A-Z][A-Za-z]+)/([A-Za-z0-9\\-.]{1,64})/([A-Z][A-Za-z]+)(/_search)?/?$");

	private final FhirContext myFhirContext;
	private final DaoRegistry myDaoRegistry;

	public CompartmentSearchFilter(FhirContext theFhirContext, DaoRegistry theDaoRegistry) {
		myFhirContext = theFhirContext;
		myDaoRegistry = theDaoRegistry;
	}

	@Override
	public void doFilter(ServletRequest theRequest, ServletResponse theResponse, FilterChain theChain)
			throws IOException, ServletException {
		HttpServletRequest req = (HttpServletRequest) theRequest;
		Matcher m = PATH.matcher(req.getRequestURI());
		boolean search = m.matches()
				&& (m.group(4) == null
						? req.getMethod().equals("GET") || req.getMethod().equals("HEAD")
						: req.getMethod().equals("POST"));
		if (!search
				|| !myFhirContext.getResourceTypes().contains(m.group(1))
				|| !myFhirContext.getResourceTypes().contains(m.group(3))
				|| !myDaoRegistry.isResourceTypeSupported(m.group(3))) {
			theChain.doFilter(theRequest, theResponse);
			return;
		}
		String compartment = m.group(1);
		String ownerId = m.group(2);
		String target = m.group(3);

		Set<String> ids = members(compartment, ownerId, target);
		String idParam = "_id=" + URLEncoder.encode(ids.isEmpty() ? NO_MEMBER : String.join(",", ids), StandardCharsets.UTF_8);
		String query = req.getQueryString();
		String newQuery = query == null || query.isEmpty() ? idParam : query + "&" + idParam;
		String newPath = "/fhir/" + target + (m.group(4) == null ? "" : "/_search");
		theChain.doFilter(new Rewritten(req, newPath, newQuery, ids.isEmpty() ? NO_MEMBER : String.join(",", ids)), theResponse);
	}

	private Set<String> members(String theCompartment, String theOwnerId, String theTarget) {
		Set<String> ids = new LinkedHashSet<>();
		if (theCompartment.equals(theTarget)) {
			ids.add(theOwnerId);
		}
		RuntimeResourceDefinition def = myFhirContext.getResourceDefinition(theTarget);
		List<RuntimeSearchParam> params = def.getSearchParamsForCompartmentName(theCompartment);
		if (params == null) {
			return ids;
		}
		IFhirResourceDao<?> dao = myDaoRegistry.getResourceDao(theTarget);
		for (RuntimeSearchParam sp : params) {
			SearchParameterMap map =
					SearchParameterMap.newSynchronous(sp.getName(), new ReferenceParam(theCompartment + "/" + theOwnerId));
			for (IIdType id : dao.searchForResourceIds(map, new SystemRequestDetails())) {
				ids.add(id.getIdPart());
			}
		}
		return ids;
	}

	/** The request as HAPI sees it: the type search with the member ids added. */
	private static final class Rewritten extends HttpServletRequestWrapper {
		private final String myUri;
		private final String myQuery;
		private final Map<String, String[]> myParams;

		Rewritten(HttpServletRequest theRequest, String theUri, String theQuery, String theIds) {
			super(theRequest);
			myUri = theUri;
			myQuery = theQuery;
			Map<String, String[]> params = new LinkedHashMap<>(theRequest.getParameterMap());
			String[] old = params.get("_id");
			if (old == null) {
				params.put("_id", new String[] {theIds});
			} else {
				String[] both = java.util.Arrays.copyOf(old, old.length + 1);
				both[old.length] = theIds;
				params.put("_id", both);
			}
			myParams = Collections.unmodifiableMap(params);
		}

		@Override
		public String getRequestURI() {
			return myUri;
		}

		@Override
		public StringBuffer getRequestURL() {
			StringBuffer url = new StringBuffer();
			url.append(getScheme()).append("://").append(getServerName()).append(':').append(getServerPort());
			return url.append(myUri);
		}

		@Override
		public String getPathInfo() {
			return myUri.substring("/fhir".length());
		}

		@Override
		public String getQueryString() {
			return myQuery;
		}

		@Override
		public Map<String, String[]> getParameterMap() {
			return myParams;
		}

		@Override
		public String getParameter(String theName) {
			String[] v = myParams.get(theName);
			return v == null || v.length == 0 ? null : v[0];
		}

		@Override
		public String[] getParameterValues(String theName) {
			return myParams.get(theName);
		}

		@Override
		public Enumeration<String> getParameterNames() {
			return Collections.enumeration(myParams.keySet());
		}
	}
}
